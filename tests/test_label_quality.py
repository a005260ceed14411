"""Label-quality metrics (phone purity, cluster purity, PNMI) and their file handling."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from utils.label_quality import joint_counts, measure, prior_accuracy, purity_and_pnmi

REPO = Path(__file__).resolve().parents[1]


def test_perfect_labels_give_pnmi_and_purities_of_one():
    phones = list("aabbbccd" * 3)
    labels = [{"a": 7, "b": 3, "c": 0, "d": 5}[p] for p in phones]
    phone_purity, cluster_purity, pnmi, h_phone, h_label = purity_and_pnmi(joint_counts(phones, labels)[0])
    assert (phone_purity, cluster_purity) == pytest.approx((1.0, 1.0))
    assert pnmi == pytest.approx(1.0)
    assert h_label == pytest.approx(h_phone)


def test_labels_finer_than_phones_are_pure_but_split_each_phone():
    phones = ["a", "a", "b", "b"] * 5
    labels = [0, 1, 2, 3] * 5  # each phone split evenly over two clusters
    phone_purity, cluster_purity, pnmi, _, _ = purity_and_pnmi(joint_counts(phones, labels)[0])
    assert phone_purity == pytest.approx(1.0)
    assert cluster_purity == pytest.approx(0.5)
    assert pnmi == pytest.approx(1.0)  # the label still determines the phone


def test_independent_labels_give_zero_pnmi():
    phones = np.repeat(["a", "b", "c"], 4 * 10)        # every (phone, label) pair equally often
    labels = np.tile(np.repeat([0, 1, 2, 3], 10), 3)
    phone_purity, cluster_purity, pnmi, h_phone, h_label = purity_and_pnmi(joint_counts(phones, labels)[0])
    assert pnmi == pytest.approx(0.0, abs=1e-12)
    assert phone_purity == pytest.approx(1 / 3)
    assert cluster_purity == pytest.approx(1 / 4)
    assert (h_phone, h_label) == pytest.approx((math.log(3), math.log(4)))


def test_hand_computed_joint_table():
    # phone a: label 0 twice, 1 once, 2 once; phone b: label 2 four times -> p(y, c) =
    #   a: .25 .125 .125     p(phone) = (.5, .5), p(label) = (.25, .125, .625)
    #   b: 0   0    .5
    phones = ["a", "a", "a", "a", "b", "b", "b", "b"]
    labels = [0, 2, 1, 0, 2, 2, 2, 2]
    counts, phone_names, label_names = joint_counts(phones, labels)
    assert counts.tolist() == [[2, 1, 1], [0, 0, 4]]
    assert (phone_names, label_names) == (["a", "b"], [0, 1, 2])
    phone_purity, cluster_purity, pnmi, h_phone, h_label = purity_and_pnmi(counts)
    assert phone_purity == pytest.approx(0.25 + 0.125 + 0.5)  # column maxima
    assert cluster_purity == pytest.approx(0.25 + 0.5)        # row maxima
    mutual_info = (0.25 * math.log(0.25 / (0.5 * 0.25)) + 0.125 * math.log(0.125 / (0.5 * 0.125))
                   + 0.125 * math.log(0.125 / (0.5 * 0.625)) + 0.5 * math.log(0.5 / (0.5 * 0.625)))
    assert h_phone == pytest.approx(math.log(2))
    assert h_label == pytest.approx(-(0.25 * math.log(0.25) + 0.125 * math.log(0.125) + 0.625 * math.log(0.625)))
    assert pnmi == pytest.approx(mutual_info / math.log(2))
    assert pnmi == pytest.approx(0.548795, abs=1e-6)


def test_joint_counts_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="equal length"):
        joint_counts(["a", "b"], [1])


# --- files: TSV + label file + alignment --------------------------------------------------------

PHONE_CYCLE = ["sil", "sil", "a", "a", "b", "b", "b", "b", "c", "c"]
PHONE_ID = {"sil": 0, "a": 1, "b": 2, "c": 3}


def frames100(n):
    return (n - 400) // 160 + 1


def frames50(n):
    return (n - 400) // 320 + 1


def write_files(tmp_path, num_samples, rate, label_shift=0):
    """TSV, labels equal to the phone ids at `rate`, and an alignment whose phones come in pairs."""
    utts = [f"100-1001-{i:04d}" for i in range(len(num_samples))]
    tsv = tmp_path / "train.tsv"
    tsv.write_text(f"{tmp_path}\n" + "".join(f"100/1001/{u}.flac\t{n}\n" for u, n in zip(utts, num_samples)))
    align, labels = [], []
    for u, n in zip(utts, num_samples):
        phones = [PHONE_CYCLE[i % len(PHONE_CYCLE)] for i in range(frames100(n))]
        align.append(f"{u}\t{' '.join(phones)}\n")
        ids = [PHONE_ID[p] for p in phones]
        utt_labels = ids if rate == 100 else [ids[2 * j] if 2 * j < len(ids) else ids[-1]
                                              for j in range(frames50(n))]
        labels.append(" ".join(str(x + label_shift) for x in utt_labels) + "\n")
    alignment = tmp_path / "align.tsv"
    alignment.write_text("".join(reversed(align)))  # the order of the alignment file does not matter
    label_file = tmp_path / "label.txt"
    label_file.write_text("".join(labels))
    return tsv, label_file, alignment


# lengths chosen so that 2 * T50 - T100 is 0 for some utterances and 1 for others
NUM_SAMPLES = [32000, 32160, 40123, 48000]


@pytest.mark.parametrize("rate", [100, 50])
def test_measure_detects_the_label_rate_and_pairs_frames(tmp_path, rate):
    assert {2 * frames50(n) - frames100(n) for n in NUM_SAMPLES} == {0, 1}
    tsv, labels, alignment = write_files(tmp_path, NUM_SAMPLES, rate)
    quality = measure(tsv, labels, [alignment])
    assert quality.label_rate == rate
    assert quality.utterances == len(NUM_SAMPLES)
    assert quality.frames == sum(min(frames100(n), 2 * frames50(n) if rate == 50 else frames100(n))
                                 for n in NUM_SAMPLES)
    assert (quality.num_phones, quality.num_clusters) == (4, 4)
    assert quality.pnmi == pytest.approx(1.0)
    assert quality.phone_purity == pytest.approx(1.0)


def test_wrong_label_rate_is_an_error_naming_the_utterance(tmp_path):
    tsv, labels, alignment = write_files(tmp_path, NUM_SAMPLES, 50)
    with pytest.raises(ValueError, match=r"utterance 100-1001-0000: 99 label frames at 10 ms \(rate 100 Hz\)"):
        measure(tsv, labels, [alignment], label_rate=100)


def test_label_count_mismatch_is_an_error(tmp_path):
    tsv, labels, alignment = write_files(tmp_path, NUM_SAMPLES, 100)
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match=r"label\.txt: 3 label lines but the TSV lists 4 utterances"):
        measure(tsv, labels, [alignment])


def test_label_length_mismatch_is_an_error_naming_the_utterance(tmp_path):
    tsv, labels, alignment = write_files(tmp_path, NUM_SAMPLES, 100)
    lines = labels.read_text().splitlines(keepends=True)
    lines[2] = " ".join(lines[2].split()[:-3]) + "\n"  # 3 frames short: more than the tolerance
    labels.write_text("".join(lines))
    with pytest.raises(ValueError, match="utterance 100-1001-0002: 246 label frames"):
        measure(tsv, labels, [alignment], label_rate=100)


def test_missing_alignment_is_an_error_naming_the_utterance(tmp_path):
    tsv, labels, alignment = write_files(tmp_path, NUM_SAMPLES, 100)
    alignment.write_text("".join(l for l in alignment.read_text().splitlines(keepends=True)
                                 if not l.startswith("100-1001-0001")))
    with pytest.raises(ValueError, match="utterance 100-1001-0001 of .*train.tsv has no alignment"):
        measure(tsv, labels, [alignment])


def test_alignment_that_does_not_fit_the_audio_is_an_error(tmp_path):
    tsv, labels, alignment = write_files(tmp_path, NUM_SAMPLES, 100)
    tsv.write_text(tsv.read_text().replace("\t40123", "\t44123"))
    with pytest.raises(ValueError, match="utterance 100-1001-0002: alignment has 249 frames but 44123 samples"):
        measure(tsv, labels, [alignment], label_rate=100)


def test_cli_prints_a_table_and_json(tmp_path):
    tsv, labels, alignment = write_files(tmp_path, NUM_SAMPLES, 50, label_shift=10)
    cmd = [sys.executable, str(REPO / "tools" / "label_quality.py"), "--tsv", str(tsv), "--labels", str(labels),
           "--alignments", str(alignment)]
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    result = json.loads(out)
    assert result["label_rate"] == 50 and result["pnmi"] == pytest.approx(1.0)
    table = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tmp_path).stdout.splitlines()
    assert table[0].split() == ["frames", "phones", "clusters", "phone_pur", "cluster_pur", "PNMI",
                                "H(phone)", "H(label)"]
    assert table[1].split()[5] == "1.000"
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "missing.tsv")], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "missing.tsv" in bad.stderr


def test_prior_accuracy_counts_the_frames_training_scores(tmp_path):
    labels = tmp_path / "label_valid.pt"
    labels.write_text("0 1 0 1 0 2\n3 3\n")
    assert prior_accuracy(labels, "mfcc") == 3 / 4  # 100 Hz: every other label -> 0 0 0 3
    assert prior_accuracy(labels, "hubert") == 3 / 8
