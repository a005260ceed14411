"""Run by test_train.py under torch.distributed.run: save this rank's weights before and after training."""
import sys

import torch

import train

out, argv = sys.argv[1], sys.argv[2:]
args = train.parse_args(argv)
trainer, module = train.build(args)
if trainer.global_rank == 0:
    torch.save(module.model.state_dict(), f"{out}.init.pt")
trainer.fit(module)
torch.save({"state_dict": module.model.state_dict(), "global_step": trainer.global_step,
            "world_size": trainer.world_size}, f"{out}.{trainer.global_rank}.pt")
