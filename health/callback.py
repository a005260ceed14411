"""The health checks live: train.py and finetune.py install this callback. After every validation, rank 0 flushes
the CSV log, reads the run's stitched history (health.history) and runs the checks (health.checks) that a run in
progress can fail; each finding is printed once, with its update, and logged as ``health_<check>`` = that update
to TensorBoard and the CSV log. Pre-training also checks its labels once, at the start. SkipGuard stops a run
whose updates keep being skipped."""
import logging
from pathlib import Path
from typing import Callable, List, Set

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from health.checks import Finding, history_findings
from health.history import read_run

log = logging.getLogger(__name__)


class HealthCallback(pl.Callback):
    def __init__(self, run_dir, label_check: Callable[[], List[Finding]] = lambda: []):
        self.run_dir = Path(run_dir)
        self.label_check = label_check
        self.reported: Set[str] = set()

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.report(trainer, self.label_check())

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()
        try:
            history = read_run(self.run_dir)
        except FileNotFoundError:  # nothing logged yet
            return
        self.report(trainer, history_findings(history, finished=False))

    def report(self, trainer, found: List[Finding]) -> None:
        for f in found:
            key = f.message if f.check == "labels" else f.check  # once per check (its numbers grow as it goes)
            if key in self.reported:
                continue
            self.reported.add(key)
            log.warning("health: %s", f.line())
            for logger in trainer.loggers:
                logger.log_metrics({f"health_{f.check.replace(' ', '_')}": float(f.step)}, step=trainer.global_step)


class SkipGuard(pl.Callback):
    """Stop training after ``max_in_a_row`` skipped updates in a row (a non-finite loss or gradient every time:
    skipped updates leave the weights as they are, so such a run would skip until its time runs out). Every
    rank decides alike (a skip is decided over all ranks). The final checkpoint is written as at any end;
    ``reason`` says why it stopped, for the script to exit with an error."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row, self.seen, self.reason = 0, 0, ""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        skipped, self.seen = pl_module.skipped_steps - self.seen, pl_module.skipped_steps
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            trainer.should_stop = True
            self.reason = (f"stopped at update {trainer.global_step + 1}: the last {self.in_a_row} updates were all "
                           f"skipped (non-finite loss or gradient); resume from last.ckpt with a lower "
                           f"--learning-rate, or look for bad audio")

    def on_train_start(self, trainer, pl_module):
        self.seen = pl_module.skipped_steps  # a resumed run's earlier skips do not count
