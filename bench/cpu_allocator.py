"""What ``utils.device.tune_cpu_allocator`` (train.py and finetune.py on CPU) saves: page faults and time of a
CPU training step with glibc's default malloc settings vs tuned.

    python bench/cpu_allocator.py                     # tiny, 2 x 4 s, 1 thread, 3 rounds of 8 steps
    python bench/cpu_allocator.py --model base --threads 2

The settings are per process, so each (setting, round) runs in a fresh child process, alternating; one step is
forward + backward of the model (the part whose activations are allocated and freed every step). The table
shows medians over rounds of the per-step figures after 2 warm-up steps.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: the repo's packages
from bench.model_step import make_batch  # noqa: E402
from model import FACTORIES  # noqa: E402
from utils.device import tune_cpu_allocator  # noqa: E402

SETTINGS = ("default", "tuned")


def child(setting: str, model_name: str, batch_size: int, seconds: float, threads: int, steps: int) -> dict:
    """Per-step milliseconds and minor page faults of ``steps`` steps after 2 warm-up steps, in this process."""
    torch.set_num_threads(threads)
    if setting == "tuned" and not tune_cpu_allocator():
        raise SystemExit("tune_cpu_allocator: not glibc, nothing to measure")
    torch.manual_seed(0)
    model = FACTORIES[f"hubert_pretrain_{model_name}"](num_classes=100)
    waveforms, labels, lengths = make_batch(100, batch_size, seconds, "cpu")

    def step():
        logit_m, logit_u, _ = model(waveforms, labels, lengths)
        (logit_m.sum() + logit_u.sum()).backward()

    for _ in range(2):
        step()
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(steps):
        step()
    return dict(ms=(time.perf_counter() - start) * 1000 / steps,
                faults=(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "base"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0, help="audio seconds per utterance")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    shape = (args.model, args.batch_size, args.seconds, args.threads, args.steps)
    if args.child:
        print(json.dumps(child(args.child, *shape)))
        return {}
    runs = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            cmd = [sys.executable, __file__, "--child", setting, "--model", args.model, "--batch-size",
                   str(args.batch_size), "--seconds", str(args.seconds), "--threads", str(args.threads),
                   "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[setting].append(json.loads(out.splitlines()[-1]))
    medians = {s: {k: statistics.median(r[k] for r in rs) for k in ("ms", "faults")} for s, rs in runs.items()}
    print(f"{args.model}, {args.batch_size} x {args.seconds:g} s, {args.threads} thread(s), forward + backward; "
          f"medians of {args.rounds} rounds x {args.steps} steps")
    print("| malloc | ms / step | page faults / step |\n|---|---|---|")
    for setting, m in medians.items():
        print(f"| {setting} | {m['ms']:.0f} | {m['faults']:.0f} |")
    print(f"tuned / default: time {medians['tuned']['ms'] / medians['default']['ms']:.2f}x, "
          f"page faults {medians['tuned']['faults'] / medians['default']['faults']:.2f}x")
    return medians


if __name__ == "__main__":
    main()
