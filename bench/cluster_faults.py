"""The fault campaign's cluster checks (bench/fault_campaign.py --checks slurm restart nodes nan): a run left
alone must end at the weights of an uninterrupted 2-rank run, bit for bit, after

- slurm: a preemption on a real one-node SLURM (bench/slurm_cluster.py): train.py on 2 srun tasks gets SIGUSR1
  (``scancel --signal=USR1``, every process of the step, loader workers too), stops and requeues itself, and the
  requeued job (started at once) continues; and SIGTERM (``scancel --signal=TERM``), then the same job again;
- restart: rank 1 SIGKILLed under ``torchrun --max-restarts 1`` (c10d rendezvous, its own store: RESTARTABLE);
- nodes: 2 torchrun agents on localhost (2 nodes x 1 process) against 1 node x 2 processes;
- nan: a NaN loss at micro-batch 1 on rank 1 (2 micro-batches per update, layer drop 0.5), over seeds: the run
  finishes with the ranks equal (before the fix most seeds crashed at the next update).
"""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.fault_campaign import CKPT_DIRS, REPO, argv, children, env, outputs, rank_of, run, same, with_flag
from bench.slurm_cluster import SlurmCluster

TWO_RANKS = ["-m", "torch.distributed.run", "--nproc_per_node=2"]
# torchrun's restarts that work: with the static rendezvous (--master_port) or c10d's shared store, the restarted
# ranks' gloo connect met stale addresses ("Connection refused") in 2 of 3 tries; c10d with its own store, 0 of 3.
RESTARTABLE = ["--rdzv-backend=c10d", "--rdzv-id=restart"]
RESTARTABLE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def two_rank_cmd(cmds) -> list:
    return with_flag(cmds["train"], "--devices", "2")


def torchrun(line, *launcher) -> list:
    return [line[0], "-m", "torch.distributed.run", *launcher, *line[1:]]


def reference(args, cmds) -> dict:
    """An uninterrupted run on 1 node x 2 processes (torchrun), once."""
    out = args.out / "cluster" / "reference"
    if not (out / CKPT_DIRS["train"] / "last.ckpt").exists():
        shutil.rmtree(out, ignore_errors=True)
        done = run(torchrun(argv(two_rank_cmd(cmds), out), "--nproc_per_node=2", "--master_port=29561"))
        assert done.returncode == 0, done.stderr[-3000:]
    return outputs("train", out)


def wait_for_checkpoint(out: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (out / CKPT_DIRS["train"] / "last.ckpt").exists():
        assert time.monotonic() < deadline, f"no checkpoint in {out}"
        time.sleep(0.2)


def slurm(args, cmds) -> list:
    """(signal, trial, stopped after update, requeues, final state, identical, stale hpc checkpoints)."""
    expected, rng, lines = reference(args, cmds), random.Random(args.seed), []
    with SlurmCluster(args.out / "cluster" / "slurm") as cluster:
        for name in ("USR1", "TERM"):
            for trial in range(args.slurm_trials):
                out = args.out / "cluster" / f"slurm_{name}_{trial}"
                shutil.rmtree(out, ignore_errors=True)
                line = argv(two_rank_cmd(cmds), out)
                script = f"#!/bin/bash\n{args.srun} --ntasks-per-node=2 {' '.join(line)}\n"
                sbatch = ["--ntasks=2", "--nodes=1", f"--chdir={REPO}", f"--output={out}.log", "--open-mode=append",
                          *(["--requeue"] if name == "USR1" else [])]
                job = cluster.submit(script, *sbatch, env=env())
                wait_for_checkpoint(out)
                time.sleep(rng.uniform(0, 10))
                cluster.signal(job, name)
                state = cluster.wait_state(job, {"PENDING", "FAILED", "COMPLETED"})
                if name == "USR1" and state["JobState"] == "PENDING":
                    cluster.start_now(job)  # requeued by train.py
                else:  # SIGTERM (or a signal after the end): the same job submitted again
                    cluster.wait_state(job, {"FAILED", "COMPLETED"})
                    job = cluster.submit(script, *sbatch, env=env())
                state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"})
                stopped = re.search(r"stopped by SIG\w+ after update (\d+)", Path(f"{out}.log").read_text())
                hpc = list(out.rglob("hpc_ckpt*"))
                lines.append((f"SIG{name}", trial, stopped[1] if stopped else "-", state["Restarts"], state["JobState"],
                              state["JobState"] == "COMPLETED" and same(outputs("train", out), expected), len(hpc)))
    return lines


def restart(args, cmds) -> list:
    """(trial, exit code, identical): rank 1 SIGKILLed once the run has a checkpoint, torchrun restarts both."""
    expected, lines = reference(args, cmds), []
    for trial in range(args.slurm_trials):
        out = args.out / "cluster" / f"restart_{trial}"
        shutil.rmtree(out, ignore_errors=True)
        line = torchrun(argv(two_rank_cmd(cmds), out), "--nproc_per_node=2", "--max-restarts=1", *RESTARTABLE,
                        f"--rdzv-endpoint=127.0.0.1:{29571 + trial}")
        with subprocess.Popen(line, cwd=REPO, env={**env(), **RESTARTABLE_ENV}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) as proc:
            wait_for_checkpoint(out)
            time.sleep(2 * trial)
            victim = next(p for p in children(proc.pid) if rank_of(p) == 1)
            os.kill(victim, signal.SIGKILL)
            _, stderr = proc.communicate(timeout=900)
        lines.append((trial, proc.returncode, proc.returncode == 0 and same(outputs("train", out), expected)))
    return lines


def nodes(args, cmds) -> list:
    """(layout, exit codes, identical to 1 node x 2 processes)."""
    expected = reference(args, cmds)
    out = args.out / "cluster" / "two_nodes"
    shutil.rmtree(out, ignore_errors=True)
    line = argv(cmds["train"], out)  # --devices 1 per node; --num-nodes from torchrun
    agents = [subprocess.Popen(torchrun(line, "--nnodes=2", f"--node-rank={rank}", "--nproc_per_node=1",
                                        "--master-addr=127.0.0.1", "--master-port=29581"),
                               cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for rank in (0, 1)]
    codes = [agent.wait(timeout=900) for agent in agents]
    return [("2 nodes x 1 process", codes, codes == [0, 0] and same(outputs("train", out), expected))]


def nan(args, cmds) -> list:
    """(seed, exit code, skipped updates per rank, ranks equal)."""
    lines = []
    for seed in range(1, args.nan_seeds + 1):
        out = args.out / "cluster" / f"nan_{seed}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = with_flag(with_flag(two_rank_cmd(cmds), "--max-updates", "6"), "--val-check-interval", "3")
        flags = argv(cmd, out)[2:]  # the flags after train.py
        line = [sys.executable, *TWO_RANKS, "--master_port=29591", str(REPO / "tests" / "ddp_worker.py"),
                str(out / "weights"), *flags, "--accumulate-grad-batches", "2", "--model-arg",
                "encoder_layer_drop=0.5", "--seed", str(seed)]
        done = subprocess.run(line, cwd=REPO, env={**env(), "POISON": "0,1,1"}, capture_output=True, text=True,
                              timeout=900)
        ranks = [torch.load(out / f"weights.{r}.pt", weights_only=True) for r in (0, 1)] if not done.returncode else []
        equal = bool(ranks) and same(ranks[0]["state_dict"], ranks[1]["state_dict"])
        lines.append((seed, done.returncode, [r["skipped_steps"] for r in ranks], equal))
    return lines
