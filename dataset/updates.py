"""One loader item per optimizer update, and a loader that resumes mid-epoch.

Each item is a group of ``accumulate`` collated micro-batches (an :class:`UpdateBatch`), so the training loop,
its validation interval and its checkpoints count updates and never stop inside an accumulation window. An
item carries its position in the epoch: the loader's state (epoch, updates consumed) skips exactly what a
checkpointed run had trained on, and random crops are drawn from a generator seeded by that position, not by
whichever worker happened to load the item.
"""
import warnings
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.preemption import ignore_in_worker

MicroBatch = Tuple[Tensor, Tensor, Tensor]  # (waveforms, labels, lengths), CollateFnHubert's output


class UpdateBatch(NamedTuple):
    epoch: int
    position: int  # index of this update in its epoch
    micro_batches: List[MicroBatch]
    num_samples: List[List[int]]  # each micro-batch's audio lengths on the host (Lightning moves the tensors)


class UpdatePlan(NamedTuple):
    """What a worker needs to build one UpdateBatch: dataset indices of each micro-batch, and the seed inputs."""
    epoch: int
    position: int
    rank: int
    batches: List[List[int]]


class UpdateSampler(Sampler[UpdatePlan]):
    """This rank's micro-batches of an epoch (``batch_sampler``, e.g. a DistributedBatchSampler: a sequence read
    as updates come due, never listed whole) dealt in order into groups of ``accumulate``; the epoch's last
    group is shorter when the count does not divide. Every rank gets the same number of micro-batches, hence
    the same group sizes.

    ``start_epoch(e)`` plans epoch ``e`` (``batch_sampler.set_epoch(e)`` re-packs and reshuffles). The
    state is (epoch, updates consumed, layout): after ``load_state_dict`` the next iteration skips the
    updates consumed in the same epoch. The training loop reports what it consumed (``consumed``), because
    workers and prefetching run ahead of it.
    """

    def __init__(self, batch_sampler: Sampler[List[int]], accumulate: int, rank: int = 0) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {accumulate}")
        self.batch_sampler = batch_sampler
        self.accumulate = accumulate
        self.rank = rank
        self.epoch: Optional[int] = None
        self.num_micro_batches = 0
        self.consumed = 0
        self._skip = 0
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)
        self.num_micro_batches = len(self.batch_sampler)
        self.epoch, self.consumed, self._skip = epoch, 0, 0

    def group(self, position: int) -> List[List[int]]:
        """The micro-batches of update ``position``, read from the batch sampler only when it is due."""
        end = min((position + 1) * self.accumulate, self.num_micro_batches)
        return [self.batch_sampler[i] for i in range(position * self.accumulate, end)]

    def layout(self) -> dict:
        """What decides the grouping: a resumed run with another layout continues at the same update count,
        but not with the same batches."""
        return {"micro_batches": self.num_micro_batches, "accumulate": self.accumulate,
                "num_replicas": getattr(self.batch_sampler, "num_replicas", 1)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "layout": self.layout()}

    def load_state_dict(self, state: dict) -> None:
        if state["epoch"] != self.epoch:  # that epoch was finished: this one starts from its beginning
            return
        if state["layout"] != self.layout():
            warnings.warn(f"resuming with a different data layout ({state['layout']} -> {self.layout()}): "
                          f"epoch {self.epoch} continues at update {state['consumed']}, but its remaining "
                          "batches are not those the checkpointed run would have seen")
        self.consumed = self._skip = min(state["consumed"], len(self))

    def __iter__(self):
        start, self._skip = self._skip, 0
        for position in range(start, len(self)):
            yield UpdatePlan(self.epoch, position, self.rank, self.group(position))

    def __len__(self) -> int:
        return -(-self.num_micro_batches // self.accumulate)


class UpdateDataset(Dataset):
    """Loads and collates the micro-batches of an UpdatePlan; crops are drawn from a generator seeded by
    (seed, epoch, position, micro-batch, rank)."""

    def __init__(self, dataset: Dataset, collate: Callable, seed: int) -> None:
        self.dataset = dataset
        self.collate = collate
        self.seed = seed

    def __getitem__(self, plan: UpdatePlan) -> UpdateBatch:
        micro_batches = []
        for micro, indices in enumerate(plan.batches):
            key = hash((self.seed, plan.epoch, plan.position, micro, plan.rank)) & 0xFFFF_FFFF
            generator = torch.Generator().manual_seed(key)
            micro_batches.append(self.collate([self.dataset[i] for i in indices], generator=generator))
        return UpdateBatch(plan.epoch, plan.position, micro_batches, [batch[2].tolist() for batch in micro_batches])


class UpdateLoader(DataLoader):
    """DataLoader of UpdateBatch items. Lightning saves ``state_dict()`` in every checkpoint and calls
    ``load_state_dict()`` on resume before it iterates, so a run resumed from a mid-epoch checkpoint sees the
    batches an uninterrupted one would. Workers persist across epochs; ``start_epoch`` plans the next one. Workers
    ignore the stop signals (utils/preemption.py: they are the training loop's to handle)."""

    def __init__(self, dataset: Dataset, batch_sampler: Sampler[List[int]], collate: Callable, *, accumulate: int,
                 seed: int, rank: int = 0, num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__(UpdateDataset(dataset, collate, seed), sampler=UpdateSampler(batch_sampler, accumulate, rank),
                         batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                         pin_memory=pin_memory, worker_init_fn=ignore_in_worker if num_workers else None)

    def start_epoch(self, epoch: int) -> None:
        self.sampler.start_epoch(epoch)

    def consumed(self, batch: UpdateBatch) -> None:
        """The training loop is done with ``batch``: a checkpoint from now on resumes after it."""
        self.sampler.consumed = batch.position + 1

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def resume_without_state(self, done: int) -> None:
        """Continue the epoch at update ``done`` for a checkpoint that has no loader state (written before the
        data position was saved): the update count is right, the remaining batches are drawn anew."""
        if 0 < done < len(self):
            warnings.warn(f"the checkpoint predates resumable data: epoch {self.sampler.epoch} continues at "
                          f"update {done}, but its remaining batches are not those the run would have seen")
        self.load_state_dict({**self.state_dict(), "consumed": done})
