"""Run by the tests under torch.distributed.run: save this rank's weights before and after training. With
POISON=STEP,MICRO,RANK in the environment, that rank's micro-batch MICRO is NaN audio, once: in the first update
from STEP on that has that many micro-batches (an epoch's last may have fewer)."""
import os
import sys

import pytorch_lightning as pl
import torch

import train


class Poison(pl.Callback):
    def __init__(self, step: int, micro: int, rank: int):
        self.step, self.micro, self.rank, self.left = step, micro, rank, 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step and trainer.global_rank == self.rank and self.left and len(
                batch.micro_batches) > self.micro:
            batch.micro_batches[self.micro][0].fill_(float("nan"))
            self.left = 0


out, argv = sys.argv[1], sys.argv[2:]
args = train.parse_args(argv)
trainer, module = train.build(args)
if os.environ.get("POISON"):
    trainer.callbacks.append(Poison(*map(int, os.environ["POISON"].split(","))))
if trainer.global_rank == 0:
    torch.save(module.model.state_dict(), f"{out}.init.pt")
trainer.fit(module)
torch.save({"state_dict": module.model.state_dict(), "global_step": trainer.global_step,
            "skipped_steps": module.skipped_steps, "world_size": trainer.world_size}, f"{out}.{trainer.global_rank}.pt")
