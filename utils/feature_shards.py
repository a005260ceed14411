"""Feature shard files: ``feat/{split}_{rank}_{num_rank}.npy`` (float32, (sum T, D): the utterances' (T, D)
features one after the other) with ``feat/len_{split}_{rank}_{num_rank}.pt`` (upstream's float32 tensor of the
frame counts) and a ``.done`` marker holding the hash of what the shard was made from, written last.

The .npy header (shape known in advance from the TSV's sample counts) is followed by rows appended with plain
writes, one utterance at a time: no memory map, so neither written nor read pages count in the process's
memory, and a shard of any size costs one utterance's features. Upstream wrote ``{split}_{rank}_{num_rank}.pt``
(``torch.save`` of one tensor); those are read too.
"""
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from utils.common_utils import atomic_write, remove_stale_temp_files

DTYPE = np.dtype("<f4")
READ_BYTES = 64 << 20  # one read() at a time: Linux returns at most ~2 GB per call


def shard_paths(feat_dir, split: str, rank: int, num_rank: int) -> Tuple[Path, Path, Path]:
    """(features, lengths, done marker) of one shard."""
    feat_dir = Path(feat_dir)
    name = f"{split}_{rank}_{num_rank}"
    return feat_dir / f"{name}.npy", feat_dir / f"len_{name}.pt", feat_dir / f"{name}.done"


def shard_is_done(feat_dir, split: str, rank: int, num_rank: int, key: str) -> bool:
    feat, lengths, done = shard_paths(feat_dir, split, rank, num_rank)
    return feat.is_file() and lengths.is_file() and done.is_file() and done.read_text() == key


def write_shard(feat_dir, split: str, rank: int, num_rank: int, features: Iterable[Tensor], lengths: Sequence[int],
                dim: int, key: str) -> None:
    """Stream ``features`` (one (T, D) tensor per utterance, T = ``lengths[i]``) into the shard's files; each
    is written to a temporary file and renamed, the done marker last."""
    feat_path, len_path, done_path = shard_paths(feat_dir, split, rank, num_rank)
    Path(feat_dir).mkdir(parents=True, exist_ok=True)
    done_path.unlink(missing_ok=True)
    remove_stale_temp_files(feat_path, len_path, done_path)
    count = 0
    with atomic_write(feat_path) as f:
        header = {"descr": DTYPE.str, "fortran_order": False, "shape": (int(sum(lengths)), dim)}
        np.lib.format.write_array_header_1_0(f, header)
        for count, feature in enumerate(features, start=1):
            if count > len(lengths) or tuple(feature.shape) != (lengths[count - 1], dim):
                expected = (lengths[count - 1], dim) if count <= len(lengths) else "nothing"
                raise ValueError(f"{feat_path}: utterance {count} has features of shape {tuple(feature.shape)}, "
                                 f"expected {expected}")
            f.write(np.ascontiguousarray(feature.numpy(), dtype=DTYPE).data)
        if count != len(lengths):
            raise ValueError(f"{feat_path}: got {count} utterances' features, expected {len(lengths)}")
    with atomic_write(len_path) as f:
        torch.save(torch.tensor(list(lengths), dtype=torch.float32), f)
    with atomic_write(done_path, "w") as f:
        f.write(key)


class ShardReader:
    """Reads a shard front to back: ours (.npy, with plain reads) or upstream's (.pt, memory-mapped). Checks
    that the features and the lengths agree."""

    def __init__(self, feat_dir, split: str, rank: int, num_rank: int):
        npy_path, len_path, _ = shard_paths(feat_dir, split, rank, num_rank)
        pt_path = npy_path.with_suffix(".pt")
        self.path = npy_path if npy_path.is_file() or not pt_path.is_file() else pt_path
        for path in (self.path, len_path):
            if not path.is_file():
                raise FileNotFoundError(f"feature shard {path} is missing (run the feature step for all shards)")
        self.lengths = torch.load(len_path, weights_only=True).long()
        self._file, self._tensor, self._row = None, None, 0
        if self.path.suffix == ".npy":
            self._file = open(self.path, "rb")
            shape, dtype = self._read_npy_header()
        else:
            self._tensor = torch.load(self.path, mmap=True, weights_only=True)
            shape = tuple(self._tensor.shape)
            dtype = DTYPE if self._tensor.dtype == torch.float32 else self._tensor.dtype
        if len(shape) != 2 or dtype != DTYPE or shape[0] != self.lengths.sum():
            self.close()
            raise ValueError(f"{self.path} has shape {shape} ({dtype}) but {len_path} sums to "
                             f"{int(self.lengths.sum())} frames of float32: the shard is inconsistent, delete it "
                             "and re-run")
        self.rows, self.dim = shape

    def _read_npy_header(self):
        try:
            version = np.lib.format.read_magic(self._file)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(self._file)
        except ValueError as e:
            raise ValueError(f"{self.path} is not a .npy feature file: {e}") from e
        return shape, None if fortran_order else dtype

    def read(self, rows: int, out: Optional[np.ndarray] = None) -> Tensor:
        """The next ``rows`` rows, into ``out`` (a C-contiguous (rows, D) float32 array) if given."""
        if self._row + rows > self.rows:
            raise ValueError(f"{self.path}: asked for rows up to {self._row + rows}, it has {self.rows}")
        out = np.empty((rows, self.dim), dtype=DTYPE) if out is None else out
        if self._tensor is not None:
            out[:] = self._tensor[self._row:self._row + rows].numpy()
        else:
            flat = memoryview(out.reshape(-1)).cast("B")
            for start in range(0, len(flat), READ_BYTES):
                want = min(READ_BYTES, len(flat) - start)
                if self._file.readinto(flat[start:start + want]) != want:
                    raise ValueError(f"{self.path} is shorter than its header says (truncated): delete it and re-run")
        self._row += rows
        return torch.from_numpy(out)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._tensor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_shard(feat_dir, split: str, rank: int, num_rank: int) -> Tuple[Tensor, Tensor]:
    """A whole shard in memory, (features (sum T, D), int64 lengths): for tools and small data (the pipeline
    streams through ``ShardReader``)."""
    with ShardReader(feat_dir, split, rank, num_rank) as reader:
        return reader.read(reader.rows), reader.lengths
