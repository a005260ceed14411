"""Lightning callbacks of train.py and finetune.py: which checkpoints stay on disk, the timing summary, the
progress bar."""
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from lightning_utilities.core.imports import RequirementCache

from utils.common_utils import SAMPLE_RATE

# RichProgressBar needs rich (Lightning's own flag moved between versions); before Lightning 2.5.3 it crashes with
# rich 14.1 and newer (it pops rich's empty live-display stack), so those get Lightning's tqdm bar.
RICH = RequirementCache("rich>=10.2.2") and (RequirementCache("pytorch-lightning>=2.5.3")
                                             or RequirementCache("rich<14.1"))


OWN_NAME = re.compile(r"epoch=\d+-step=\d+\.ckpt")  # the only files CheckpointKeeper writes and prunes


class CheckpointKeeper(pl.Callback):
    """After every validation, and when training ends, the state is written once, as upstream's
    ``epoch=E-step=S.ckpt``; it stays while it is among the ``top_k`` lowest of any of ``monitors``
    (val_loss and train_loss, upstream's two ModelCheckpoints) or is the newest. ``last.ckpt`` is a symbolic
    link to the newest (a copy where links are not allowed). Lightning's pair of ModelCheckpoints wrote the
    same state up to three times (a ``-v1`` copy for the second monitor and a full ``last.ckpt``).

    The kept lists are part of every checkpoint, so a run resumed in the same folder keeps pruning them.
    """

    def __init__(self, dirpath, top_k: int = 5, monitors: Sequence[str] = ("val_loss", "train_loss")):
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.dirpath = Path(dirpath)
        self.top_k = top_k
        self.best: Dict[str, List[Tuple[float, str]]] = {m: [] for m in monitors}  # lowest first
        self.newest: Optional[str] = None

    @property
    def last(self) -> Path:
        return self.dirpath / "last.ckpt"

    def kept(self) -> set:
        return {name for ranked in self.best.values() for _, name in ranked} | {self.newest}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.save(trainer, ranked=True)

    def on_train_end(self, trainer, pl_module):
        """Training usually stops mid-epoch (at --max-updates), after the last validation: the final state is
        kept as the newest (not ranked: the last val_loss belongs to an earlier state). Unless that validation
        was at the last update: its checkpoint holds the final state already (Lightning's epoch count has moved
        on since, so it was written a second time under the next epoch's name)."""
        if self.newest is not None and self.newest.endswith(f"-step={trainer.global_step}.ckpt"):
            return
        self.save(trainer, ranked=False)

    def save(self, trainer, ranked: bool) -> None:
        name = f"epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
        if name == self.newest:
            return
        before = self.kept()
        for monitor, ranking in self.best.items():
            value = trainer.callback_metrics.get(monitor)
            if ranked and value is not None and math.isfinite(float(value)):
                ranking[:] = sorted([*(r for r in ranking if r[1] != name), (float(value), name)])[:self.top_k]
        previous, self.newest = self.newest, name
        try:
            trainer.save_checkpoint(self.dirpath / name, weights_only=False)  # every rank takes part; rank 0 writes
        except OSError as e:  # a full disk: say which file, and that the last good one is still there
            self.newest = previous
            kept = f"; {self.last} still points at {previous}" if previous else ""
            raise OSError(e.errno, f"could not write checkpoint {self.dirpath / name}: {e.strerror}{kept}") from e
        if trainer.is_global_zero:
            link(self.dirpath / name, self.last)
            for stale in before - self.kept() - {None}:
                (self.dirpath / stale).unlink(missing_ok=True)
            ranks = [f"{m} #{[n for _, n in r].index(name) + 1}" for m, r in self.best.items()
                     if name in (n for _, n in r)]
            print(f"saved {self.dirpath / name}" + (f" ({', '.join(ranks)} of the best {self.top_k})" if ranks else ""))
        trainer.strategy.barrier("checkpoint kept")

    def state_dict(self) -> dict:
        return {"dirpath": str(self.dirpath.resolve()), "best": self.best, "newest": self.newest}

    def load_state_dict(self, state: dict) -> None:
        """Only in the folder it was written for, and only files that are still there and are named as this
        keeper names them: the names are later pruned, so a state from elsewhere naming '../x', '/x' or any other
        file would have it deleted."""
        if not isinstance(state, dict) or state.get("dirpath") != str(self.dirpath.resolve()):
            return
        best = state.get("best") if isinstance(state.get("best"), dict) else {}
        self.best = {m: [(float(v), n) for v, n in map(_pair, best.get(m, [])) if self._own(n)][:self.top_k]
                     for m in self.best}
        self.newest = state.get("newest") if self._own(state.get("newest")) else None

    def _own(self, name) -> bool:
        return isinstance(name, str) and OWN_NAME.fullmatch(name) is not None and (self.dirpath / name).is_file()


def _pair(entry) -> tuple:
    """A (value, name) ranking entry, or (nan, None) for anything else."""
    ok = isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], (int, float))
    return tuple(entry) if ok else (math.nan, None)


def link(target: Path, path: Path) -> None:
    """Point ``path`` at ``target`` (same folder), replacing it atomically: a relative symbolic link, or a copy
    on filesystems without links."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target.name, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    os.replace(tmp, path)


class TrainStatCallback(pl.Callback):
    """Rank 0 prints epoch and validation times and a summary at the end: time per update after
    ``skip_steps`` updates and the time the training loop waited for data. Logged every update (rank 0's, from
    the batch's host-side lengths and shapes: no device sync): ``data_wait`` (seconds before the update's batch
    arrived; the first update of an epoch includes starting it), ``audio_seconds_per_second`` (this rank's audio
    over the time since the previous update ended, waits included, validation not) and ``padding_share`` (the
    share of the batch tensors that is padding)."""

    def __init__(self, skip_steps: int):
        self.skip_steps = skip_steps
        self.fit_start = self.epoch_start = self.val_start = 0.0
        self.timed_start: Optional[Tuple[float, int]] = None
        self.ready = 0.0  # when the loop became ready for the next batch
        self.epoch_first = True
        self.data_wait = self.first_batch_wait = 0.0

    def on_fit_start(self, trainer, pl_module):
        self.fit_start = time.perf_counter()

    def on_train_start(self, trainer, pl_module):  # a resumed run may start mid-epoch, without epoch start
        self.epoch_start = self.ready = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start = self.ready = time.perf_counter()
        self.epoch_first = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        wait = time.perf_counter() - self.ready
        self.data_wait += wait
        if self.epoch_first:
            self.first_batch_wait += wait
            self.epoch_first = False
        pl_module.log("data_wait", wait)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        audio = sum(map(sum, batch.num_samples))
        pl_module.log("padding_share", 1 - audio / sum(micro[0].numel() for micro in batch.micro_batches))
        pl_module.log("audio_seconds_per_second", audio / SAMPLE_RATE / (now - self.ready))
        if self.timed_start is None and trainer.global_step >= self.skip_steps:
            self.timed_start = (now, trainer.global_step)
        self.ready = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module):
        self.val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero and not trainer.sanity_checking:
            print(f"epoch {trainer.current_epoch}: validation {time.perf_counter() - self.val_start:.1f} s")
        self.ready = time.perf_counter()  # validation (and its checkpoint) is not waiting for data

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            print(f"epoch {trainer.current_epoch}: {time.perf_counter() - self.epoch_start:.1f} s, "
                  f"global step {trainer.global_step}")

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        total = time.perf_counter() - self.fit_start
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        rate = ""
        if self.timed_start is not None and trainer.global_step > self.timed_start[1]:
            t0, s0 = self.timed_start
            rate = f", {(time.perf_counter() - t0) / (trainer.global_step - s0):.2f} s/update after warm-up"
        print(f"done: {trainer.global_step} updates in {total / 60:.1f} min{rate}; waited {self.data_wait:.1f} s "
              f"for data ({self.first_batch_wait:.1f} s of it for first batches of epochs); "
              f"train_loss {m.get('train_loss', float('nan')):.3f}, "
              f"val_loss {m.get('val_loss', float('nan')):.3f}, "
              f"val masked accuracy {m.get('val_masked_accuracy', float('nan')):.3f}, "
              f"skipped updates {pl_module.skipped_steps}")


class UpdateProgressBar(RichProgressBar):
    """Lightning's rich bar, without its "Epoch 0/-2": a run bounded by --max-updates has no last epoch, which
    Lightning writes as max_epochs -1."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"Epoch {current_epoch}".ljust(len(self.validation_description))


def progress_bars() -> list:
    """Ours where Lightning would show its rich bar; elsewhere its tqdm bar, which shows no last epoch."""
    return [UpdateProgressBar()] if RICH else []
