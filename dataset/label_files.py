"""Frame labels of a split, read an utterance at a time without loading the file, so a rank's memory and start-up
stay nearly flat in corpus size (60 k h of 50 Hz labels is ~40 GB of text). Two formats:

- text (upstream's, the default): ``label_{split}.pt``, one line of space-separated cluster ids per utterance.
  It is read through a line index (line starts, label counts) that one pass over the file builds; the index
  is cached beside it as ``label_{split}.pt.index.npz``, keyed by the file's size and mtime (preprocess.py
  writes it with the labels, so a training run does not scan them).
- npy: ``label_{split}.npy``, every utterance's ids back to back (uint16, int32 beyond 65536 clusters), and
  ``label_{split}.offsets.npy``, int64 offset of each utterance's first id plus the total. Half the text's size;
  memory-mapped, so the ranks and workers of a node share one page-cache copy.
"""
import io
import logging
import zipfile
from pathlib import Path
from typing import List, Tuple

import numpy as np

from utils.common_utils import atomic_write

from .text_blocks import NEWLINE, FileRanges, whole_lines

log = logging.getLogger(__name__)

SPACE = 32
BLOCK = 1 << 24  # bytes scanned at a time


def npy_paths(label_dir, split: str) -> Tuple[Path, Path]:
    """(ids, offsets) of a split's npy labels."""
    label_dir = Path(label_dir)
    return label_dir / f"label_{split}.npy", label_dir / f"label_{split}.offsets.npy"


def text_path(label_dir, split: str) -> Path:
    return Path(label_dir) / f"label_{split}.pt"


def label_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint16 if num_classes <= 1 << 16 else np.int32)


def npy_header(dtype: np.dtype, length: int) -> bytes:
    """The .npy header of a 1-D array, for files written as a stream of raw ids after it."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                             "shape": (length,)})
    return f.getvalue()


class TextLabels:
    def __init__(self, path) -> None:
        self.path = Path(path)
        self.starts, self.counts = text_index(self.path)  # starts: one more than lines (the file's end)
        self._file = FileRanges(self.path)

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, index: int) -> np.ndarray:
        try:
            return np.array(self._file.read(int(self.starts[index]), int(self.starts[index + 1])).split(),
                            dtype=np.int64)
        except (ValueError, OverflowError) as e:  # OverflowError: an id beyond int64
            raise ValueError(f"{self.path}:{index + 1}: not a line of integer labels ({e})") from None


class NpyLabels:
    """Memory-mapped ids and offsets, mapped on first use in each process: pickled into a DataLoader worker it
    carries the paths, not a copy of the maps."""

    def __init__(self, path, offsets_path) -> None:
        self.path, self.offsets_path = Path(path), Path(offsets_path)
        ids, offsets = self._open()
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"{self.path}: expected a 1-D array of integer labels, got {ids.dtype} {ids.shape}")
        if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) < 1 or offsets[0] != 0 \
                or offsets[-1] != len(ids) or (np.diff(offsets) < 0).any():
            raise ValueError(f"{self.offsets_path}: not the offsets of {self.path} ({len(ids)} labels): expected "
                             f"int64 from 0, non-decreasing, ending at {len(ids)}")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_ids", "_offsets")}

    def _open(self) -> Tuple[np.ndarray, np.ndarray]:
        if "_ids" not in self.__dict__:
            for p in (self.path, self.offsets_path):
                if not p.is_file():
                    raise FileNotFoundError(f"{p}: npy label file not found (run preprocess.py first)")
            self._ids, self._offsets = map(_load_npy, (self.path, self.offsets_path))
        return self._ids, self._offsets

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self._open()[1])

    def __len__(self) -> int:
        return len(self._open()[1]) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        ids, offsets = self._open()
        return np.asarray(ids[offsets[index]:offsets[index + 1]], dtype=np.int64)


def _load_npy(path: Path) -> np.ndarray:
    """A memory-mapped .npy, never unpickled: an object array (a pickle, which runs code) or a file that is no
    .npy is an error naming it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a .npy array of integer labels ({e})") from None


def open_labels(label_dir, split: str):
    """The split's npy labels if preprocess.py wrote them (``--label-format npy``), else its text labels."""
    ids, offsets = npy_paths(label_dir, split)
    if ids.is_file() or offsets.is_file():
        return NpyLabels(ids, offsets)
    path = text_path(label_dir, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file not found (run preprocess.py first)")
    return TextLabels(path)


def text_index_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.index.npz")


def _stamp(path: Path) -> List[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def text_index(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(line starts plus the file's size, labels per line) of a text label file, from its cache if that is
    of this very file, else by a scan that then refreshes the cache (where the folder is writable)."""
    cache = text_index_path(path)
    try:
        with np.load(cache, allow_pickle=False) as z:
            if z["stamp"].tolist() == _stamp(path):
                return z["starts"], z["counts"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        pass  # no cache, or not this file's
    return write_text_index(path)


def write_text_index(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    stamp = _stamp(path)
    starts, counts = _scan(path)
    try:
        with atomic_write(text_index_path(path)) as f:
            np.savez(f, starts=starts, counts=counts, stamp=np.array(stamp, dtype=np.int64))
    except OSError as e:
        log.warning("could not cache the line index of %s (%s): each start scans it again", path, e)
    return starts, counts


def _scan(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """One pass in blocks of whole lines: where each line starts and how many space-separated ids it has."""
    starts, counts = [np.zeros(1, dtype=np.int64)], []
    with open(path, "rb") as f:
        for offset, block, ends in whole_lines(f, BLOCK):
            token = (block != SPACE) & (block != NEWLINE)
            token[1:] &= ~token[:-1]  # first byte of each id (a block starts at a line start)
            ids_before_end = np.searchsorted(np.flatnonzero(token), ends)
            counts.append(np.diff(ids_before_end, prepend=0))
            starts.append(offset + ends + 1)
    starts = np.concatenate(starts)
    starts[-1] = min(starts[-1], path.stat().st_size)  # the newline added above is not in the file
    return starts, np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
