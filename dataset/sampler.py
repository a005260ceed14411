"""Length-bucketed batching (spec §4.2-4.4): batches of similar-length utterances under a sample budget,
optionally costed at bucket-aligned lengths so that padded shapes come from a small fixed set, and a
distributed wrapper that deals whole batches to ranks."""
import bisect
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

ALIGN_MODES = ("none", "bucket1", "bucket2")


def bucket_boundaries(num_buckets: int, min_len: int, max_len: int) -> Tensor:
    """Float32 boundaries, as upstream: bucket k holds lengths in (boundaries[k-1], boundaries[k]]."""
    return torch.linspace(min_len - 1, max_len + 1, num_buckets + 1)


@dataclass(frozen=True)
class BucketAligner:
    """Maps a length to the first bucket boundary strictly greater than it, rounded up to an int.

    A length exactly on an integer boundary goes to the next one (e.g. 141000 -> 162801 with the README
    buckets), as in Habana's ``gen_bucket_boundary_fn``; this is what fixes the padded shapes. A class
    rather than a closure so DataLoader workers can pickle it."""

    boundaries: Tuple[float, ...]

    def __call__(self, length: int) -> int:
        i = bisect.bisect_right(self.boundaries, length)
        if i == len(self.boundaries):
            raise ValueError(f"length {length} is not below the last bucket boundary {self.boundaries[-1]}")
        return math.ceil(self.boundaries[i])


class BucketizeBatchSampler(Sampler[List[int]]):
    """Batches of dataset indices, packed greedily in length order under ``max_token_count`` samples
    (or ``batch_size`` items).

    Samples outside ``[min_len, max_len]`` are dropped. The kept samples are sorted by length (stable),
    put in ``num_buckets`` equal-width buckets, shuffled within each bucket if ``shuffle`` (by a generator
    seeded with ``seed``, like torchaudio; Habana drew from the global RNG, which only hurt
    reproducibility), and packed in bucket order; a batch may span two adjacent buckets. With
    ``align_buckets='bucket1'`` a sample costs its bucket-aligned length, so the padded batch the aligned
    collate builds stays within budget; ``'bucket2'`` aligns only in the collate (parity runs). The batch
    list is built here for epoch 0 and again by ``set_epoch`` (seed ``seed + epoch``; torchaudio made a new
    sampler seeded with the epoch every epoch). Reshuffled packing changes the batch count a little from
    epoch to epoch.
    """

    def __init__(self, lengths: Sequence[int], num_buckets: int, min_len: int = 0, max_len: Optional[int] = None,
                 max_token_count: Optional[float] = None, batch_size: Optional[int] = None, shuffle: bool = True,
                 drop_last: bool = False, align_buckets: str = "none", seed: int = 0) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if max_len is None:
            max_len = int(lengths.max())
        if not 0 <= min_len <= max_len:
            raise ValueError(f"need 0 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        if (max_token_count is None) == (batch_size is None):
            raise ValueError("set exactly one of max_token_count and batch_size")
        if max_token_count is not None and max_len > max_token_count:
            raise ValueError(f"max_len={max_len} exceeds max_token_count={max_token_count}: "
                             f"the longest sample would not fit in a batch")
        if align_buckets not in ALIGN_MODES:
            raise ValueError(f"align_buckets must be one of {ALIGN_MODES}, got {align_buckets!r}")
        kept = np.flatnonzero((lengths >= min_len) & (lengths <= max_len))
        if len(kept) == 0:
            raise ValueError(f"no sample length lies in [{min_len}, {max_len}]")
        order = kept[np.argsort(lengths[kept], kind="stable")]
        self.lengths = lengths[order]  # sorted
        self.indices = order  # their dataset indices
        self.max_token_count = max_token_count
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.align_buckets = align_buckets
        self.seed = seed
        self.epoch = 0
        self.boundaries = bucket_boundaries(num_buckets, min_len, max_len)
        self.buckets = self._get_buckets()
        self.costs = self._costs()
        self._flat, self._bounds = self._pack()

    def set_epoch(self, epoch: int) -> None:
        """Re-pack the batches with the within-bucket shuffle of ``epoch`` (nothing changes without shuffle)."""
        if epoch != self.epoch:
            self.epoch = epoch
            if self.shuffle:
                self._flat, self._bounds = self._pack()

    def gen_bucket_boundary_fn(self) -> BucketAligner:
        """The aligner for ``CollateFnHubert(pad=True, aligner=...)`` (Habana's name)."""
        return BucketAligner(tuple(self.boundaries.tolist()))

    def _get_buckets(self) -> Dict[int, Tensor]:
        """Bucket id -> positions in the sorted list; ids ascending, empty buckets absent."""
        bucket_ids = torch.bucketize(torch.from_numpy(self.lengths), self.boundaries)
        ids, counts = torch.unique_consecutive(bucket_ids, return_counts=True)
        positions = torch.arange(len(self.lengths), dtype=torch.int32).split(counts.tolist())
        return dict(zip(ids.tolist(), positions))

    def _costs(self) -> np.ndarray:
        """What each sorted sample counts against the budget."""
        if self.batch_size is not None:
            return np.ones(len(self.lengths), dtype=np.int64)
        if self.align_buckets != "bucket1":
            return self.lengths
        # BucketAligner on every length at once: the first boundary strictly greater, rounded up.
        boundaries = np.array(self.gen_bucket_boundary_fn().boundaries)
        costs = np.ceil(boundaries[np.searchsorted(boundaries, self.lengths, side="right")]).astype(np.int64)
        if costs.max() > self.max_token_count:
            raise ValueError(f"align_buckets='bucket1' counts a sample of {self.lengths[-1]} samples as "
                             f"{costs.max()}, more than max_token_count={self.max_token_count}")
        return costs

    def _pack(self) -> Tuple[np.ndarray, np.ndarray]:
        """(dataset indices in batch order, where each batch starts plus the end): greedy packing, each batch
        as long as the next sample fits, found by a search in the running cost rather than a loop per sample."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = []
        for positions in self.buckets.values():
            if self.shuffle:
                positions = positions[torch.randperm(len(positions), generator=generator)]
            order.append(positions.numpy())
        order = np.concatenate(order)
        spent = np.concatenate([[0], np.cumsum(self.costs[order])])
        budget = self.max_token_count if self.max_token_count is not None else self.batch_size
        bounds, start = [0], 0
        while start < len(order):
            start = int(np.searchsorted(spent, spent[start] + budget, side="right")) - 1
            bounds.append(start)
        if self.batch_size is not None and self.drop_last and bounds[-1] - bounds[-2] < self.batch_size:
            bounds.pop()
        return self.indices[order], np.array(bounds, dtype=np.int64)

    def __getitem__(self, i: int) -> List[int]:
        return self._flat[self._bounds[i]:self._bounds[i + 1]].tolist()

    def __iter__(self) -> Iterator[List[int]]:
        return (self[i] for i in range(len(self)))

    def __len__(self) -> int:
        return len(self._bounds) - 1


class DistributedBatchSampler(Sampler[List[int]]):
    """Deals the batches of ``batch_sampler`` round-robin to ``num_replicas`` ranks.

    With ``shuffle`` the batch order is permuted by a generator seeded with ``seed + epoch``, so
    ``set_epoch`` reshuffles (and passes the epoch on to ``batch_sampler``) and the same epoch repeats.
    Without ``drop_last`` the list is padded (by repeating batches from its start) to the next multiple of
    ``num_replicas`` only; upstream added a full extra round when it was already a multiple. World size and
    rank default to torch.distributed's, or to a single process when it is not initialised.
    """

    def __init__(self, batch_sampler: Sampler[List[int]], num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.batch_sampler = batch_sampler
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._cache = (None, None)

    @property
    def num_samples(self) -> int:
        """Batches per rank this epoch (the inner sampler's count can change with the epoch)."""
        num_batches = len(self.batch_sampler)
        return num_batches // self.num_replicas if self.drop_last else math.ceil(num_batches / self.num_replicas)

    @property
    def total_size(self) -> int:
        return self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def _rank_batches(self) -> np.ndarray:
        """Positions in ``batch_sampler`` of this rank's batches this epoch (cached per epoch)."""
        num_batches = len(self.batch_sampler)
        if self._cache[0] != (self.epoch, num_batches):
            ids = np.arange(num_batches)
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + self.epoch)
                ids = torch.randperm(num_batches, generator=generator).numpy()
            ids = np.resize(ids, self.total_size)  # cyclic, so even fewer batches than ranks get padded
            self._cache = ((self.epoch, num_batches), ids[self.rank::self.num_replicas])
        return self._cache[1]

    def __getitem__(self, i: int) -> List[int]:
        return list(self.batch_sampler[int(self._rank_batches()[i])])

    def __iter__(self) -> Iterator[List[int]]:
        return (self[i] for i in range(len(self)))

    def __len__(self) -> int:
        return self.num_samples
