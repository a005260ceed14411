"""Preemption and shutdown: SIGUSR1 (SLURM's warning, ``--signal=USR1@N``: a time limit or a preemption is near)
and SIGTERM (``scancel``, a drained node) stop training after the update in hand, with one checkpoint there, from
which a relaunch of the same command resumes exactly; SIGUSR1 also requeues the SLURM job.

Lightning's own handling is replaced while training runs. Its SLURM handler (auto-requeue) ran in every
DataLoader worker too, each saving a checkpoint of its stale copy of the state, and saved mid-update in the main
process (the resumed run validated one update early); its SIGTERM handler broadcast from inside the handler, so
when one rank got the signal first the job hung, and it saved nothing."""
import os
import signal
import subprocess
import sys

import pytorch_lightning as pl
import torch

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader workers' init: the signals are the main process's (SLURM signals every process of a step). A
    worker that died of SIGTERM failed its main process at once ("DataLoader worker ... killed by signal:
    Terminated"). Workers still leave when their main process stops them or dies."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class Preemption(pl.Callback):
    """The main process of each rank notes the signal; after every update the ranks agree (a max over ranks, so
    a signal that reached one rank stops all at the same update) and training stops there: the update's
    validation and checkpoint if they are due, else the final checkpoint (CheckpointKeeper), as at any end.
    ``stopped_by`` names the signal; ``leave`` requeues and exits."""

    def __init__(self):
        self.received = 0
        self.stopped_by = ""
        self._pid = None

    def on_train_start(self, trainer, pl_module):
        self._pid = os.getpid()
        for signum in SIGNALS:  # Lightning registered its handlers just before training starts
            signal.signal(signum, self._note)
            # Interrupted system calls restart: the signal is only noted, and native code (torch's checkpoint
            # writer, gloo, OpenMP) need not handle EINTR (a run under srun once aborted with a corrupted heap
            # when SIGUSR1 came as it wrote a checkpoint).
            signal.siginterrupt(signum, False)

    def _note(self, signum, frame):
        if os.getpid() == self._pid:  # loader workers fork with this handler (and ignore it from their init on)
            self.received = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        signum = int(trainer.strategy.reduce(torch.tensor(self.received, device=pl_module.device), reduce_op="max"))
        if not signum or trainer.should_stop:
            return
        # Lightning validates at any step where should_stop is set: only where this step's validation is due.
        epoch_loop = trainer.fit_loop.epoch_loop
        due = epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
        trainer.should_stop = True
        epoch_loop._skip_next_val = not due
        self.stopped_by = signal.Signals(signum).name

    def leave(self, trainer, script: str) -> None:
        """After training stopped: requeue the SLURM job on SIGUSR1 (rank 0, ``scontrol requeue``), then exit with
        128 + the signal's number, as a process the signal ended would."""
        job = os.environ.get("SLURM_JOB_ID")
        said = "relaunch the same command to continue"
        if self.stopped_by == "SIGUSR1" and job:
            said = f"SLURM job {job} requeued"
            if trainer.is_global_zero:
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                if done.returncode:
                    said = f"scontrol requeue {job} failed: {done.stderr.strip()}; {said}"
        print(f"{script}: stopped by {self.stopped_by} after update {trainer.global_step}, checkpoint written; "
              f"{said}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.Signals[self.stopped_by].value)
