"""Label quality of k-means targets against frame-level phone alignments (HuBERT paper, §V-C).

With p(y, c) the joint distribution of phone y and cluster label c over all frames
(the same definitions as fairseq's examples/hubert/measure_teacher_quality.py):

* phone purity   = sum_c p(c) max_y p(y | c) = sum_c max_y p(y, c)
  (how pure each cluster is in phones, averaged over clusters weighted by their frames);
* cluster purity = sum_y p(y) max_c p(c | y) = sum_y max_c p(y, c)
  (how concentrated each phone is in one cluster; it drops as the number of clusters grows);
* PNMI           = I(y; c) / H(y), phone-normalized mutual information: the fraction of the
  phone uncertainty that the label removes (1 for labels that determine the phone, 0 for
  labels independent of it). Entropies are in nats; PNMI does not depend on the unit.
  On few frames it is biased upwards: random labels score about (K - 1)(Y - 1) / (2 N H(phone))
  for K labels, Y phones and N frames (about 0.04 for K = 100 on the 21k training frames of demo_data/).

Frame rates: alignments have one phone per 10 ms frame; frame i covers samples [160 i, 160 i + 400)
and takes the phone at its centre 160 i + 200. MFCC labels have the same frames (100 Hz).
HuBERT-layer labels are at 50 Hz: frame j of the model has its centre at 320 j + 200, the centre of
10 ms frame 2 j, so each 50 Hz label is repeated twice (as ESPnet does) and the longer sequence is
trimmed; up to MAX_FRAME_MISMATCH frames of difference are tolerated, more is an error.
"""
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

MAX_FRAME_MISMATCH = 2  # in 10 ms frames


@dataclass
class LabelQuality:
    """Result of measure(); `frames` counts the 10 ms frames that entered the joint table."""
    utterances: int
    frames: int
    label_rate: int
    num_phones: int
    num_clusters: int
    phone_purity: float
    cluster_purity: float
    pnmi: float
    h_phone: float
    h_label: float

    def to_dict(self):
        return asdict(self)


def joint_counts(phones, labels):
    """Counts of (phone, label) pairs; returns (counts [num_phones, num_labels], phone names,
    label names), rows and columns in sorted order. Both sequences must have the same length."""
    phones, labels = np.asarray(phones), np.asarray(labels)
    if phones.shape != labels.shape or phones.ndim != 1:
        raise ValueError(f"need two 1-D sequences of equal length, got {phones.shape} and {labels.shape}")
    phone_names, phone_ids = np.unique(phones, return_inverse=True)
    label_names, label_ids = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(phone_names), len(label_names)), dtype=np.int64)
    np.add.at(counts, (phone_ids, label_ids), 1)
    return counts, phone_names.tolist(), label_names.tolist()


def entropy(p):
    """Entropy in nats of a probability vector (zeros ignored)."""
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def purity_and_pnmi(counts):
    """(phone purity, cluster purity, PNMI, H(phone), H(label)) of a phone x label count table."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.sum() <= 0 or (counts < 0).any():
        raise ValueError("need a non-negative 2-D count table with at least one count")
    p_xy = counts / counts.sum()
    p_x, p_y = p_xy.sum(axis=1), p_xy.sum(axis=0)
    phone_purity = float(p_xy.max(axis=0).sum())
    cluster_purity = float(p_xy.max(axis=1).sum())
    nz = p_xy > 0
    mutual_info = float((p_xy[nz] * np.log(p_xy[nz] / np.outer(p_x, p_y)[nz])).sum())
    h_phone, h_label = entropy(p_x), entropy(p_y)
    pnmi = mutual_info / h_phone if h_phone > 0 else 1.0  # one phone only: nothing to explain
    return phone_purity, cluster_purity, pnmi, h_phone, h_label


def read_tsv(path):
    """Utterance ids (file stems) and sample counts from a preprocess TSV (line 1 = root dir)."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty TSV (expected the root directory on line 1)")
    ids, num_samples = [], []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].isdigit():
            raise ValueError(f"{path}:{number}: expected '<relative path>\\t<num_samples>', got {line!r}")
        ids.append(Path(fields[0]).stem)
        num_samples.append(int(fields[1]))
    return ids, num_samples


def read_labels(path, num_utterances):
    """Label file: one line of space-separated integers per utterance, in TSV order."""
    lines = Path(path).read_text().splitlines()
    if len(lines) != num_utterances:
        raise ValueError(f"{path}: {len(lines)} label lines but the TSV lists {num_utterances} utterances")
    try:
        return [np.array(line.split(), dtype=np.int64) for line in lines]
    except ValueError as e:
        raise ValueError(f"{path}: labels must be space-separated integers ({e})") from e


def read_alignments(paths):
    """{utt-id: array of phones} from one or more '<utt-id>\\t<phone> <phone> ...' files."""
    alignments = {}
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            utt, sep, phones = line.partition("\t")
            if not sep or not phones.strip():
                raise ValueError(f"{path}:{number}: expected '<utt-id>\\t<phone> <phone> ...'")
            if utt in alignments:
                raise ValueError(f"{path}:{number}: utterance {utt} is aligned twice")
            alignments[utt] = np.array(phones.split())
    return alignments


def detect_label_rate(labels, num_samples):
    """100 or 50: the rate whose frame count floor((N - 400) / hop) + 1 fits the labels best."""
    total = sum(len(x) for x in labels)
    t100 = sum((n - 400) // 160 + 1 for n in num_samples)
    t50 = sum((n - 400) // 320 + 1 for n in num_samples)
    return 100 if abs(total - t100) <= abs(total - t50) else 50


def paired_frames(utt, phones, labels, label_rate):
    """Phones and labels of one utterance on the 10 ms grid, trimmed to a common length."""
    if label_rate == 50:
        labels = np.repeat(labels, 2)
    elif label_rate != 100:
        raise ValueError(f"label rate must be 50 or 100 Hz, got {label_rate}")
    if abs(len(labels) - len(phones)) > MAX_FRAME_MISMATCH:
        raise ValueError(f"utterance {utt}: {len(labels)} label frames at 10 ms (rate {label_rate} Hz) "
                         f"but {len(phones)} aligned frames; wrong files or label rate?")
    n = min(len(labels), len(phones))
    return phones[:n], labels[:n]


def measure(tsv_path, label_path, alignment_paths, label_rate=None):
    """Label quality of `label_path` (TSV order) against the phone alignments; returns LabelQuality.
    Every TSV utterance needs an alignment; alignments of other utterances are ignored."""
    ids, num_samples = read_tsv(tsv_path)
    if not ids:
        raise ValueError(f"{tsv_path}: no utterances")
    labels = read_labels(label_path, len(ids))
    alignments = read_alignments([alignment_paths] if isinstance(alignment_paths, (str, Path))
                                 else alignment_paths)
    return measure_arrays(ids, num_samples, labels, alignments, label_rate, source=tsv_path)


def measure_arrays(ids, num_samples, labels, alignments, label_rate=None, source="the labels"):
    """measure() on in-memory data: utterance ids, their sample counts, their label arrays and the
    {utt-id: phones} alignments."""
    rate = label_rate or detect_label_rate(labels, num_samples)
    all_phones, all_labels = [], []
    for utt, n, utt_labels in zip(ids, num_samples, labels):
        if utt not in alignments:
            raise ValueError(f"utterance {utt} of {source} has no alignment")
        phones = alignments[utt]
        expected = (n - 400) // 160 + 1
        if abs(len(phones) - expected) > MAX_FRAME_MISMATCH:
            raise ValueError(f"utterance {utt}: alignment has {len(phones)} frames but {n} samples "
                             f"give {expected}")
        phones, utt_labels = paired_frames(utt, phones, utt_labels, rate)
        all_phones.append(phones)
        all_labels.append(utt_labels)
    counts, phone_names, label_names = joint_counts(np.concatenate(all_phones), np.concatenate(all_labels))
    phone_purity, cluster_purity, pnmi, h_phone, h_label = purity_and_pnmi(counts)
    return LabelQuality(utterances=len(ids), frames=int(counts.sum()), label_rate=rate,
                        num_phones=len(phone_names), num_clusters=len(label_names),
                        phone_purity=phone_purity, cluster_purity=cluster_purity, pnmi=pnmi,
                        h_phone=h_phone, h_label=h_label)


def prior_accuracy(label_path, feature_type: str) -> float:
    """Accuracy of always guessing the most frequent label, on the frames training scores (50 Hz: MFCC
    labels are 100 Hz and train.py keeps every other one): the floor a model's masked accuracy must beat."""
    return prior_of((np.array(line.split(), dtype=np.int64) for line in Path(label_path).read_text().splitlines()),
                    feature_type)


def prior_of(labels: Iterable[np.ndarray], feature_type: str) -> float:
    """``prior_accuracy`` of utterances' label arrays."""
    step = 2 if feature_type == "mfcc" else 1
    ids = np.concatenate([np.asarray(x)[::step] for x in labels])
    return float(np.bincount(ids).max() / len(ids))
