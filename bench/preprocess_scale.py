"""preprocess.py at growing corpus sizes: peak memory, disk and CPU of each stage, and the 960 h figures they
extrapolate to.

    python bench/preprocess_scale.py                            # 0.5, 1, 2, 4 h
    python bench/preprocess_scale.py --baseline /tmp/main_code  # also whole runs of another checkout's preprocess.py

Corpora: noise FLACs with LibriSpeech-like lengths (bench/data_path.py), kept in --work between runs. Each stage
runs in a process of its own, through the functions preprocess.py runs: tsv (file lists and the audio check),
features (what k-means fits on), fit (k-means), labels (train and valid; what k-means did not fit on is
extracted on the fly). Peak RSS and CPU time (user + system) are the stage process's own (wait4), disk is what
its outputs add. Iteration 1: MFCC, all frames; iteration 2: layer 4 of a randomly initialised
hubert_pretrain_tiny (256-dim), --percent 0.1. --num-rank 2, so shards grow with the corpus; --valid-percent
0.05, so valid has files at every size (the baseline's code stopped when none fell there). CPU time, not wall
time: the machine may be shared.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: the repo's packages
import preprocess  # noqa: E402
from bench.data_path import SAMPLE_RATE, librispeech_like_lengths, write_corpus  # noqa: E402
from model import hubert_pretrain_tiny  # noqa: E402

STAGES = ("tsv", "features", "fit", "labels")
MB = 1e6


def run_stage(stage: str, argv) -> None:
    """One stage of preprocess.py's main, alone (run in the child process)."""
    job = preprocess.setup(preprocess.parse_args(argv))
    if stage == "tsv":
        preprocess.make_file_lists(job)
        return
    plan = preprocess.Plan.read(job)
    if stage == "features":
        preprocess.dump_kmeans_features(job, plan)
    elif stage == "fit":
        preprocess.fit(job)
    else:
        preprocess.write_label_parts(job, plan)
        preprocess.merge_labels(job, plan)


def tree_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file()) if folder.is_dir() else 0


def measure(cmd, cwd: Path, data_dir: Path, log_path: Path) -> dict:
    """Run ``cmd``; its peak RSS (MB) and CPU seconds from wait4, and the bytes it added under data_dir."""
    before = tree_bytes(data_dir)
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed; its log:\n{log_path.read_text()[-3000:]}")
    return dict(rss=usage.ru_maxrss * 1024 / MB, cpu=usage.ru_utime + usage.ru_stime,
                disk=(tree_bytes(data_dir) - before) / MB)


def make_corpus(work: Path, hours: float) -> Path:
    """A noise corpus of ``hours`` of audio (cached in work); returns the --root-dir."""
    root = work / f"corpus_{hours:g}h"
    if not (root / "done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        lengths = librispeech_like_lengths(int(hours * 3600 / 10) + 10, seed=1)
        lengths = lengths[:np.searchsorted(np.cumsum(lengths), hours * 3600 * SAMPLE_RATE) + 1]
        write_corpus(root, lengths)
        (root / "done").write_text(str(len(lengths)))
    return root / "audio"


def iteration_args(args, iteration: int, root: Path, exp: Path) -> list:
    argv = ["--root-dir", str(root), "--exp-dir", str(exp), "--num-cluster", str(args.num_cluster), "--num-rank", "2",
            "--valid-percent", str(args.valid_percent)]
    if iteration == 1:
        return argv + ["--feat-type", "mfcc"]
    checkpoint = args.work / "tiny_random.ckpt"
    if not checkpoint.is_file():
        torch.manual_seed(0)
        model = hubert_pretrain_tiny()
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    "hubert_config": model.config}, checkpoint)
    return argv + ["--feat-type", "hubert", "--layer-index", "4", "--checkpoint-path", str(checkpoint),
                   "--percent", str(args.percent)]


def data_dir_of(exp: Path, iteration: int) -> Path:
    return exp / "data" / ("mfcc" if iteration == 1 else "hubert_4")


def run_size(args, hours: float, iteration: int) -> dict:
    """Every stage of one iteration on one corpus; rows by stage, plus the k-means sample's bytes."""
    root = make_corpus(args.work, hours)
    exp = args.work / f"exp_{hours:g}h_it{iteration}"
    shutil.rmtree(exp, ignore_errors=True)
    argv = iteration_args(args, iteration, root, exp)
    data_dir = data_dir_of(exp, iteration)
    rows = {}
    for stage in STAGES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--", *argv]
        rows[stage] = measure(cmd, REPO, data_dir, exp.parent / f"{exp.name}_{stage}.log")
    rows["fit"]["sample"] = tree_bytes(data_dir / "feat", "*.npy") / MB
    hours_listed = sum(int(line.split("\t")[1]) for split in ("train", "valid")
                       for line in (data_dir / f"tsv/librispeech_{split}.tsv").read_text().splitlines()[1:])
    return dict(rows=rows, hours=hours_listed / SAMPLE_RATE / 3600)


def run_baseline(args, hours: float, iteration: int) -> dict:
    """A whole run of another checkout's preprocess.py (e.g. the code before this bench) on the same corpus."""
    exp = args.work / f"exp_{hours:g}h_it{iteration}_baseline"
    shutil.rmtree(exp, ignore_errors=True)
    argv = iteration_args(args, iteration, make_corpus(args.work, hours), exp)
    return measure([sys.executable, "preprocess.py", *argv], args.baseline, data_dir_of(exp, iteration),
                   exp.parent / f"{exp.name}.log")


def extrapolate(results: dict, to_hours: float) -> dict:
    """Least-squares line through each stage's figures over corpus hours, evaluated at ``to_hours``."""
    out = {}
    hours = np.array([r["hours"] for r in results])
    for stage in STAGES + ("run",):
        row = {}
        for key in ("rss", "disk", "cpu") + (("sample",) if stage == "fit" else ()):
            values = np.array([stage_row(r, stage)[key] for r in results])
            slope, intercept = np.polyfit(hours, values, 1)
            row[key] = dict(intercept=intercept, per_hour=slope, at=intercept + slope * to_hours)
        out[stage] = row
    return out


def stage_row(result: dict, stage: str) -> dict:
    """A stage's figures, or the whole run's ("run": peak RSS of the largest stage, disk and CPU summed)."""
    rows = result["rows"]
    if stage != "run":
        return rows[stage]
    return dict(rss=max(r["rss"] for r in rows.values()), disk=sum(r["disk"] for r in rows.values()),
                cpu=sum(r["cpu"] for r in rows.values()))


def print_tables(results: dict, baselines: dict, to_hours: float) -> dict:
    extrapolated = {}
    for iteration, by_size in results.items():
        print(f"\niteration {iteration}: peak RSS MB / disk added MB / CPU s per stage, by corpus size")
        print(f"{'stage':<10}" + "".join(f"{r['hours']:>24.2f} h" for r in by_size))
        for stage in STAGES + ("run",):
            print(f"{stage:<10}" + "".join(
                f"{stage_row(r, stage)['rss']:>10.0f}{stage_row(r, stage)['disk']:>8.1f}{stage_row(r, stage)['cpu']:>8.1f}"
                for r in by_size))
        print(f"{'sample MB':<10}" + "".join(f"{r['rows']['fit']['sample']:>26.1f}" for r in by_size))
        print(f"{'fit-sample':<10}" + "".join(f"{r['rows']['fit']['rss'] - r['rows']['fit']['sample']:>26.0f}"
                                            for r in by_size))
        if iteration in baselines:
            print(f"{'baseline':<10}" + "".join(f"{b['rss']:>10.0f}{b['disk']:>8.1f}{b['cpu']:>8.1f}" if b else " " * 26
                                              for b in baselines[iteration]))
        if len(by_size) < 2:
            continue  # nothing to extrapolate along
        ext = extrapolated[iteration] = extrapolate(by_size, to_hours)
        print(f"line fit: value = a + b * hours; at {to_hours:g} h")
        print(f"{'stage':<10}{'RSS a MB':>10}{'b MB/h':>9}{'RSS GB':>9}{'disk MB/h':>11}{'disk GB':>9}"
              f"{'CPU s/h':>9}{'CPU h':>8}")
        for stage, row in ext.items():
            print(f"{stage:<10}{row['rss']['intercept']:>10.0f}{row['rss']['per_hour']:>9.1f}{row['rss']['at'] / 1e3:>9.2f}"
                  f"{row['disk']['per_hour']:>11.2f}{row['disk']['at'] / 1e3:>9.1f}{row['cpu']['per_hour']:>9.1f}"
                  f"{row['cpu']['at'] / 3600:>8.2f}")
        sample = ext["fit"]["sample"]
        print(f"k-means sample: {sample['per_hour']:.2f} MB/h ({sample['at'] / 1e3:.1f} GB at {to_hours:g} h); fit peak "
              f"RSS - sample: {ext['fit']['rss']['at'] / 1e3 - sample['at'] / 1e3:.2f} GB at {to_hours:g} h")
    return extrapolated


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hours", default="0.5,1,2,4", help="corpus sizes, audio hours (two or more to extrapolate)")
    p.add_argument("--iterations", default="1,2")
    p.add_argument("--num-cluster", type=int, default=100)
    p.add_argument("--percent", type=float, default=0.1, help="iteration 2's k-means sample")
    p.add_argument("--valid-percent", type=float, default=0.05)
    p.add_argument("--work", type=Path, default=Path("bench_preprocess"), help="corpora and runs (kept)")
    p.add_argument("--baseline", type=Path, help="a checkout whose preprocess.py is also run whole, for comparison")
    p.add_argument("--baseline-hours", help="sizes for the baseline (default: all)")
    p.add_argument("--extrapolate-to", type=float, default=960.0, help="audio hours (LibriSpeech 960 h)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    args.hours = [float(h) for h in args.hours.split(",")]
    args.iterations = [int(i) for i in args.iterations.split(",")]
    args.baseline_hours = [float(h) for h in args.baseline_hours.split(",")] if args.baseline_hours else args.hours
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {i: [run_size(args, h, i) for h in args.hours] for i in args.iterations}
    baselines = {i: [run_baseline(args, h, i) if h in args.baseline_hours else None for h in args.hours]
                 for i in args.iterations} if args.baseline else {}
    extrapolated = print_tables(results, baselines, args.extrapolate_to)
    out = dict(results=results, baselines=baselines, extrapolated=extrapolated)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--stage":
        run_stage(sys.argv[2], sys.argv[4:])  # [--stage NAME -- preprocess.py arguments]
    else:
        main()
