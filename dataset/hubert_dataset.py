"""HuBERT pre-training data (spec §1.1, §4.1, §4.5): utterances listed in a TSV, k-means labels in a
text file, and the collate that crops (or pads) a batch so audio and labels stay frame-aligned."""
import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from utils.common_utils import load_audio

from .label_files import open_labels
from .manifest import Manifest

SAMPLE_RATE = 16000
KERNEL = 400  # receptive field of the conv feature extractor (25 ms at 16 kHz)
STRIDE = 320  # its hop (20 ms), i.e. 50 Hz model frames
LABEL_HOP = {"mfcc": 160, "hubert": 320}  # label hop in samples: MFCC labels are 100 Hz, HuBERT 50 Hz


def num_frames(num_samples: int, hop: int = STRIDE) -> int:
    """Frames of a 400-sample window sliding by ``hop`` over ``num_samples`` (the conv stack's output
    length for ``hop=320``)."""
    return (num_samples - KERNEL) // hop + 1


def expected_num_labels(num_samples: int, feature_type: str) -> int:
    """Label count that the k-means step writes for an utterance of ``num_samples`` samples."""
    if feature_type not in LABEL_HOP:
        raise ValueError(f"feature_type must be one of {sorted(LABEL_HOP)}, got {feature_type!r}")
    return num_frames(num_samples, LABEL_HOP[feature_type])


class HuBERTDataSet(Dataset):
    """Utterances of ``exp_dir/tsv/{dataset}_{subset}.tsv`` with labels from ``exp_dir/label/``: upstream's text
    ``label_{subset}.pt`` (one line per TSV entry) or the npy pair preprocess.py writes with ``--label-format
    npy`` (see dataset.label_files). Items are ``(waveform (1, N) float32, label (L,) int64, N)``.

    No length filtering or sorting here: ``len_list`` feeds the sampler, which does both. With
    ``feature_type`` given, every utterance's label count is checked against its audio length at construction
    (from the label index, without reading the labels), so a label file from the wrong step or iteration fails
    before training rather than silently misaligning. With ``num_classes`` given, labels must lie in
    ``[0, num_classes)``: the first utterances are checked at construction (labels of a k-means with more
    clusters show up at once), every item when it is loaded. Memory holds a few numbers per utterance, not
    the lists (dataset.manifest, dataset.label_files).
    """

    def __init__(self, exp_dir: Union[str, Path], dataset: str, subset: str,
                 feature_type: Optional[str] = None, num_classes: Optional[int] = None) -> None:
        exp_dir = Path(exp_dir)
        self.tsv_path = exp_dir / "tsv" / f"{dataset}_{subset}.tsv"
        self.manifest = Manifest(self.tsv_path)
        self.manifest.check_files()
        self.len_list = self.manifest.lengths
        self.labels = open_labels(exp_dir / "label", subset)
        self.label_path = self.labels.path
        if len(self.labels) != len(self.manifest):
            raise ValueError(f"{self.label_path}: has {len(self.labels)} label lines but {self.tsv_path} "
                             f"lists {len(self.manifest)} utterances; labels must be made from this TSV")
        if feature_type is not None:
            self._check_label_counts(feature_type)
        self.num_classes = num_classes
        if num_classes is not None:
            for i in range(min(len(self.labels), 100)):
                self._load_label(i)

    def __len__(self) -> int:
        return len(self.manifest)

    def _check_label_counts(self, feature_type: str) -> None:
        expected_num_labels(KERNEL, feature_type)  # validates feature_type
        n, counts = self.len_list, self.labels.counts
        want = (n - KERNEL) // LABEL_HOP[feature_type] + 1
        bad = np.flatnonzero((n >= KERNEL) & (counts != want))  # shorter: never trained on
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{self.label_path}:{i + 1}: {counts[i]} labels, but "
                             f"{self.manifest.audio_path(i)} has {n[i]} samples, which needs {want[i]} labels for "
                             f"feature type {feature_type!r}")

    def _load_audio(self, index: int) -> Tensor:
        path = self.manifest.audio_path(index)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} (line {index + 2} of {self.tsv_path}) does not exist")
        # Channel 0, as preprocess.py; NaN/inf and a length other than the TSV's are errors naming the file.
        return load_audio(path, int(self.len_list[index]), str(self.tsv_path)).unsqueeze(0)

    def _load_label(self, index: int) -> Tensor:
        label = self.labels[index]
        if self.num_classes is not None and len(label) and not 0 <= label.min() <= label.max() < self.num_classes:
            bad = label.max() if label.max() >= self.num_classes else label.min()
            raise ValueError(f"{self.label_path}:{index + 1}: label {bad} is outside [0, {self.num_classes}); "
                             f"--num-classes must be the k-means cluster count of these labels")
        return torch.from_numpy(label)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor, int]:
        waveform = self._load_audio(index)
        return waveform, self._load_label(index), waveform.shape[1]


def _crop_audio_label(waveform: Tensor, label: Tensor, crop_len: int, rand_crop: bool,
                      generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, int]:
    """Cut ``crop_len`` samples (a random window if ``rand_crop``) and the labels of the model frames
    that overlap it: label_offset is the first frame that ends after the crop start."""
    w = waveform[0]
    frame_offset = 0
    if len(w) > crop_len and rand_crop:
        frame_offset = int(torch.randint(len(w) - crop_len, size=(1,), generator=generator))
    elif len(w) < crop_len:
        crop_len = len(w)  # pad mode: shorter samples keep their length and get zero padding
    label_offset = max((frame_offset - KERNEL) // STRIDE + 1, 0)
    w = w[frame_offset:frame_offset + crop_len]
    label = label[label_offset:label_offset + num_frames(crop_len)]
    return w, label, crop_len


class CollateFnHubert:
    """Batch ``(waveform, label, N)`` items into ``(waveforms (B, T) float32, labels (B, L) int64,
    lengths (B,) int64)``.

    ``pad=False`` crops every sample to the shortest one (a random window if ``rand_crop``);
    ``pad=True`` zero-pads to the longest. With an ``aligner`` (Habana bucket alignment) the batch is
    padded further to ``aligner(T)`` samples and ``floor((aligner(T)-400)/320)+1`` label columns, so
    waveform shapes come from a small fixed set. MFCC labels (100 Hz) are downsampled by 2 to the model's
    50 Hz. Cropping draws from ``generator`` when one is passed (training: one seeded per micro-batch
    position, so crops do not depend on which worker loaded the batch), else from the global torch RNG.
    """

    def __init__(self, feature_type: str, pad: bool = False, rand_crop: bool = True,
                 aligner: Optional[Callable[[int], int]] = None) -> None:
        expected_num_labels(KERNEL, feature_type)  # validates feature_type
        self.feature_type = feature_type
        self.pad = pad
        self.rand_crop = rand_crop
        self.aligner = aligner

    def __call__(self, batch: List[Tuple[Tensor, Tensor, int]],
                 generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        sizes = [sample[0].shape[1] for sample in batch]
        target = max(sizes) if self.pad else min(sizes)
        aligned = None
        if self.aligner is not None:
            aligned = self.aligner(target)
            if aligned < target:
                raise ValueError(f"aligner maps length {target} to a shorter {aligned}")
        waveforms, labels, lengths = [], [], []
        for i, (waveform, label, _) in enumerate(batch):
            self._check_label(i, label, waveform.shape[1])
            if self.feature_type == "mfcc":
                label = label[::2]
            waveform, label, length = _crop_audio_label(waveform, label, target, self.rand_crop, generator)
            waveforms.append(waveform)
            labels.append(label)
            lengths.append(length)
        waveforms = pad_sequence(waveforms, batch_first=True)
        labels = pad_sequence(labels, batch_first=True)
        if aligned is not None:
            waveforms = F.pad(waveforms, (0, aligned - waveforms.shape[1]))
            labels = F.pad(labels, (0, num_frames(aligned) - labels.shape[1]))
        return waveforms, labels, torch.tensor(lengths, dtype=torch.int64)

    def _check_label(self, i: int, label: Tensor, num_samples: int) -> None:
        want = expected_num_labels(num_samples, self.feature_type)
        if len(label) != want:
            raise ValueError(
                f"batch item {i}: {len(label)} labels for {num_samples} samples, but feature type "
                f"{self.feature_type!r} needs {want}; check that the label file was made from this TSV "
                f"and that --feature-type matches the labels")
