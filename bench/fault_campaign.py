"""Fault campaign: every script SIGKILLed at many seeded points, then re-run; disk full while writing; corrupt
checkpoints; one DDP rank killed; on a cluster left alone (bench/cluster_faults.py): SLURM preemption and
SIGTERM on a real one-node SLURM, a rank restarted by torchrun, 2 nodes against 1, a NaN at micro-batch 1 under
DDP. Prints a table (BENCHMARKS.md records it).

For each of preprocess.py (iteration 1: MFCC; iteration 2: a HuBERT layer), train.py and finetune.py, on the demo
corpus with the tiny model: one uninterrupted reference run, then ``--kills`` trials, each a fresh run killed
with SIGKILL at a time drawn uniformly over the reference's duration and re-run the way a user re-runs it (the
same command; train.py and finetune.py resume from ``last.ckpt`` when there is one). A trial survives when the
re-run ends with the reference's outputs (preprocess.py: every file of ``data/<feature>/`` byte-identical;
train.py / finetune.py: the final weights and update count equal, bit for bit) and leaves no temporary or
half-written file.

    python bench/fault_campaign.py --out exp_faults [--kills 20 --seed 0 --jobs 2 --scripts train
                                                     --checks kill disk corrupt ddp slurm restart nodes nan]
"""
import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from utils.checkpoint import load_checkpoint  # noqa: E402

ENV_THREADS = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--model-name", "hubert_pretrain_tiny", "--accelerator", "cpu", "--devices", "1", "--num-workers", "1",
        "--seconds-per-batch", "16", "--val-check-interval", "2"]
CKPT_DIRS = {"train": "checkpoints_librispeech_hubert_pretrain_tiny", "finetune": "checkpoints_hubert_pretrain_tiny"}
SCRIPTS = ("preprocess_mfcc", "train", "preprocess_hubert", "finetune")
CHECKS = ("kill", "disk", "corrupt", "ddp")
CLUSTER_CHECKS = ("slurm", "restart", "nodes", "nan")  # bench/cluster_faults.py: only train.py's reference needed


def env():
    return {**os.environ, **ENV_THREADS, "PYTHONPATH": str(REPO)}


def commands(corpus: Path, work: Path, updates: int) -> dict:
    """Each script's command line for an output folder ``{out}``: the recipe's stages on ``corpus``."""
    audio = str((corpus / "LibriSpeech").resolve())
    labels = ["--num-cluster", "20", "--num-rank", "4", "--valid-percent", "0.1"]
    iter1 = work / "reference" / "train" / CKPT_DIRS["train"] / "last.ckpt"
    return {
        "preprocess_mfcc": ["preprocess.py", "--root-dir", audio, "--exp-dir", "{out}", "--feat-type", "mfcc", *labels],
        "train": ["train.py", "--dataset-path", str(work / "reference" / "preprocess_mfcc" / "data" / "mfcc"),
                  "--exp-dir", "{out}", "--feature-type", "mfcc", "--num-classes", "20", *TINY,
                  "--max-updates", str(updates), "--warmup-updates", "2"],
        "preprocess_hubert": ["preprocess.py", "--root-dir", audio, "--exp-dir", "{out}", "--feat-type", "hubert",
                              "--layer-index", "4", "--checkpoint-path", str(iter1), "--percent", "0.5", *labels],
        "finetune": ["finetune.py", "--checkpoint", str(iter1), "--exp-dir", "{out}",
                     "--train-dir", str(corpus / "LibriSpeech" / "train-clean-100"),
                     "--valid-dir", str(corpus / "LibriSpeech" / "dev-clean"), *TINY,
                     "--max-updates", str(updates), "--warmup-updates", "2", "--hold-updates", "2",
                     "--decay-updates", "4", "--freeze-encoder-updates", "2"],
    }


def argv(cmd, out: Path, resume=False):
    line = [sys.executable, *(str(out) if a == "{out}" else a for a in cmd)]
    last = last_ckpt(cmd, out)
    if resume and last is not None and last.exists():
        line += ["--resume-checkpoint", str(last)]
    return line


def last_ckpt(cmd, out: Path):
    script = Path(cmd[0]).stem
    return out / CKPT_DIRS[script] / "last.ckpt" if script in CKPT_DIRS else None


def run(line, limit_bytes=None, timeout=900):
    def limit():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(line, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit)


def kill_at(line, seconds: float) -> bool:
    """Start ``line``, SIGKILL it after ``seconds``; whether it was still running then."""
    with subprocess.Popen(line, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            proc.wait(timeout=seconds)
            return False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True


def file_content(path: Path) -> bytes:
    """A file's bytes; of a label line index, what it indexes (it also holds its label file's mtime)."""
    if path.name.endswith(".index.npz"):
        with np.load(path) as z:
            return z["starts"].tobytes() + z["counts"].tobytes()
    return path.read_bytes()


def outputs(name: str, out: Path):
    """What must equal the reference: preprocess.py's files, or train/finetune's final update and weights."""
    if name.startswith("preprocess"):
        folder = next((out / "data").iterdir())
        return {p.relative_to(folder).as_posix(): file_content(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    ckpt = load_checkpoint(out / CKPT_DIRS[name] / "last.ckpt")
    return {"global_step": ckpt["global_step"], **ckpt["state_dict"]}


def with_flag(cmd, flag: str, value: str) -> list:
    """``cmd`` with ``flag``'s value replaced."""
    cmd = [*cmd]
    cmd[cmd.index(flag) + 1] = value
    return cmd


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def leftovers(out: Path) -> list:
    """Temporary or partial files: ours start with '.', Lightning's and fsspec's end in .tmp / .part."""
    return [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and
            (p.name.startswith(".") or p.suffix in (".tmp", ".part") or ".tmp" in p.name)]


def trial(name, cmd, out: Path, at: float, reference) -> dict:
    killed = kill_at(argv(cmd, out), at)
    rerun = run(argv(cmd, out, resume=True))
    ok = rerun.returncode == 0
    result = {"at": round(at, 2), "killed": killed, "rerun_ok": ok, "identical": False, "leftovers": []}
    if ok:
        result["identical"] = same(outputs(name, out), reference)
        result["leftovers"] = leftovers(out)
    else:
        result["error"] = rerun.stderr[-1500:]
    shutil.rmtree(out, ignore_errors=True)
    return result


def references(args, cmds) -> None:
    """One uninterrupted run of each script (in the recipe's order: later ones read earlier outputs)."""
    for name, cmd in cmds.items():
        ref_out = args.out / "reference" / name
        if not (ref_out / "done.json").exists():
            shutil.rmtree(ref_out, ignore_errors=True)
            start = time.perf_counter()
            done = run(argv(cmd, ref_out))
            if done.returncode != 0:
                raise SystemExit(f"reference run of {name} failed:\n{done.stderr[-3000:]}")
            (ref_out / "done.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))


def sigkill_campaign(args, cmds) -> dict:
    rng = random.Random(args.seed)
    results = {}
    for name, cmd in cmds.items():
        ref_out = args.out / "reference" / name
        seconds = json.loads((ref_out / "done.json").read_text())["seconds"]
        reference = outputs(name, ref_out)
        points = [rng.uniform(0.5, seconds) for _ in range(args.kills)]
        outs = [args.out / "trials" / f"{name}_{i:02d}" for i in range(args.kills)]
        with ThreadPoolExecutor(args.jobs) as pool:
            results[name] = list(pool.map(lambda a: trial(name, cmd, a[1], a[0], reference), zip(points, outs)))
        results[name + "_seconds"] = seconds
        print(row(name, results[name], seconds), flush=True)
    return results


def row(name, trials, seconds) -> str:
    killed = sum(t["killed"] for t in trials)
    survived = sum(t["rerun_ok"] for t in trials)
    identical = sum(t["identical"] for t in trials)
    left = sum(bool(t["leftovers"]) for t in trials)
    return f"| {name} | {seconds:.0f} | {killed} | {survived} | {identical} | {left} |"


def disk_full(args, cmds) -> list:
    """Writes that hit a file-size limit (RLIMIT_FSIZE: write() fails with EFBIG, as with a full disk):
    train.py's checkpoint after one was written, preprocess.py's feature shards after one shard finished."""
    lines = []
    out = args.out / "disk_full" / "train"
    shutil.rmtree(out, ignore_errors=True)
    assert run(argv(with_flag(cmds["train"], "--max-updates", "4"), out)).returncode == 0
    before = (out / CKPT_DIRS["train"] / "last.ckpt").resolve()
    # checkpoints are ~65 MB, logs far less
    failed = run(argv(with_flag(cmds["train"], "--max-updates", "8"), out, resume=True), limit_bytes=1 << 20)
    after = (out / CKPT_DIRS["train"] / "last.ckpt").resolve()
    intact = after == before and load_checkpoint(after)["global_step"] == 4
    lines.append(("train.py checkpoint", failed.returncode != 0, intact, len(leftovers(out)), last_line(failed.stderr)))

    out = args.out / "disk_full" / "preprocess"
    shutil.rmtree(out, ignore_errors=True)
    assert run([*argv(cmds["preprocess_mfcc"], out), "--rank", "1"]).returncode == 0
    feat = out / "data" / "mfcc" / "feat"
    shard1 = {p.name: p.read_bytes() for p in feat.glob("*_1_4*")}
    failed = run(argv(cmds["preprocess_mfcc"], out), limit_bytes=64 << 10)
    intact = bool(shard1) and shard1 == {p.name: p.read_bytes() for p in feat.glob("*_1_4*")}
    lines.append(("preprocess.py features", failed.returncode != 0, intact, len(leftovers(out)),
                  last_line(failed.stderr)))
    rerun_ok, same_files = rerun_with_space(args, cmds, out)
    lines.append(("preprocess.py re-run with space", rerun_ok, same_files, len(leftovers(out)), ""))

    # Labels: every shard's features and k-means are done; the joined label file is over the limit, the
    # per-shard parts are not.
    out = args.out / "disk_full" / "labels"
    shutil.rmtree(out, ignore_errors=True)
    for extra in ([["--rank", str(r)] for r in range(1, 5)] + [["--fit-only"]]):
        assert run([*argv(cmds["preprocess_mfcc"], out), *extra]).returncode == 0
    label = out / "data" / "mfcc" / "label"
    joined = (args.out / "reference" / "preprocess_mfcc" / "data" / "mfcc" / "label" / "label_train.pt").stat().st_size
    failed = run(argv(cmds["preprocess_mfcc"], out), limit_bytes=joined // 2)
    parts = {p.name: p.read_bytes() for p in label.glob("*.part")}
    _, same_files = rerun_with_space(args, cmds, out)
    lines.append(("preprocess.py label file", failed.returncode != 0, bool(parts) and same_files,
                  len(leftovers(out)), last_line(failed.stderr)))
    return lines


def rerun_with_space(args, cmds, out: Path):
    """preprocess.py re-run without the limit: (finished, every file equal to the reference's)."""
    rerun = run(argv(cmds["preprocess_mfcc"], out))
    ok = rerun.returncode == 0
    return ok, ok and same(outputs("preprocess_mfcc", out),
                           outputs("preprocess_mfcc", args.out / "reference" / "preprocess_mfcc"))


def bad_checkpoints(args, cmds) -> list:
    """--resume-checkpoint given a truncated file and one with bytes overwritten in the middle."""
    good = (args.out / "reference" / "train" / CKPT_DIRS["train"] / "last.ckpt").read_bytes()
    folder = args.out / "bad_checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = bytearray(good)
    corrupt[len(good) // 2:len(good) // 2 + 4096] = bytes(4096)
    lines = []
    for what, bad, data in (("truncated", folder / "truncated.ckpt", good[:len(good) // 3]),
                            ("4 KiB zeroed mid-file", folder / "damaged.ckpt", bytes(corrupt))):
        bad.write_bytes(data)
        for name in ("train", "finetune"):
            done = run([*argv(cmds[name], folder / name), "--resume-checkpoint", str(bad)])
            lines.append((f"{name}.py, {what}", done.returncode, bad.name in done.stderr, last_line(done.stderr)))
            shutil.rmtree(folder / name, ignore_errors=True)
    return lines


def children(pid: int) -> list:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *children(int(child))]
    return found


def rank_of(pid: int):
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"LOCAL_RANK=")]
    return int(ranks[0]) if ranks else None


def ddp_kill(args, cmds) -> list:
    """Two gloo DDP ranks; rank 1 SIGKILLed once the run has written a checkpoint: how each launcher ends."""
    lines = []
    cmd = with_flag(with_flag(cmds["train"], "--devices", "2"), "--max-updates", "40")
    launchers = {"torch.distributed.run": ["-m", "torch.distributed.run", "--nproc_per_node=2",
                                           "--master_port=29541"],
                 "Lightning's own (--devices 2)": []}
    for launcher, prefix in launchers.items():
        out = args.out / "ddp_kill" / launcher.split()[0]
        shutil.rmtree(out, ignore_errors=True)
        line = argv(cmd, out)
        line = [line[0], *prefix, *line[1:]]
        with subprocess.Popen(line, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) as proc:
            deadline = time.monotonic() + 600
            while not (out / CKPT_DIRS["train"] / "last.ckpt").exists() and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            victim = next((p for p in children(proc.pid) if rank_of(p) == 1), None)
            if victim is None:
                proc.kill()
                lines.append((launcher, "rank 1 not found", "", ""))
                continue
            killed_at = time.monotonic()
            with contextlib.suppress(ProcessLookupError):  # gone already: the timing below says so
                os.kill(victim, signal.SIGKILL)
            try:
                _, stderr = proc.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
                stderr = "still running after 600 s"
            gone = time.monotonic() - killed_at
            lines.append((launcher, proc.returncode, f"{gone:.1f}", last_line(stderr)))
    return lines


def last_line(stderr: str) -> str:
    """The line that says what happened: torchrun's failure summary names the rank's exit code."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip() and set(line.strip()) != {"="}]
    told = [line for line in lines if "exitcode" in line] or lines
    return told[-1][:160] if told else ""


def main(argv_=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "exp_faults")
    p.add_argument("--corpus", type=Path, default=REPO / "demo_data")
    p.add_argument("--kills", type=int, default=20, help="SIGKILL trials per script")
    p.add_argument("--updates", type=int, default=8, help="train.py / finetune.py updates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="trials at once (one thread each)")
    p.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS,
                   help="scripts to kill (and the ones before them, whose outputs they read)")
    p.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS + CLUSTER_CHECKS)
    p.add_argument("--slurm-trials", type=int, default=2, help="trials per signal (slurm) and restarts (restart)")
    p.add_argument("--nan-seeds", type=int, default=6, help="seeds of the nan check")
    p.add_argument("--srun", default="srun", help="srun's path in the SLURM job script (slurm)")
    args = p.parse_args(argv_)
    args.out = args.out.resolve()
    cmds = commands(args.corpus.resolve(), args.out, args.updates)
    only_train = set(args.checks) <= set(CLUSTER_CHECKS)
    last = max(SCRIPTS.index(s) for s in (args.scripts if args.checks == ["kill"] else ["train"] if only_train
                                           else SCRIPTS))
    cmds = {name: cmds[name] for name in SCRIPTS[:last + 1]}
    references(args, cmds)
    results = {}
    if "kill" in args.checks:
        print("| script | reference s | killed | re-run ok | identical | left temp files |")
        print("|---|---|---|---|---|---|")
        results = sigkill_campaign(args, {name: cmds[name] for name in args.scripts})
    for check, (check_fn, header) in TABLES.items():
        if check in args.checks:
            results[check] = check_fn(args, cmds)
            print(f"\n| {' | '.join(header)} |\n|{'---|' * len(header)}")
            for line in results[check]:
                print(f"| {' | '.join(map(str, line))} |")
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


TABLES = {
    "disk": (disk_full, ("disk full while writing", "run failed", "earlier output intact", "left temp files",
                         "last line")),
    "corrupt": (bad_checkpoints, ("--resume-checkpoint", "exit code", "names the file", "last line")),
    "ddp": (ddp_kill, ("DDP, 2 gloo ranks, rank 1 SIGKILLed", "exit code", "seconds until all exited", "last line")),
    "slurm": (lambda a, c: cluster_check("slurm", a, c), (
        "SLURM, 2 srun tasks, signal", "trial", "stopped after update", "requeues", "final job state",
        "identical to uninterrupted", "hpc checkpoints")),
    "restart": (lambda a, c: cluster_check("restart", a, c), (
        "torchrun --max-restarts 1, rank 1 SIGKILLed: trial", "exit code", "identical to uninterrupted")),
    "nodes": (lambda a, c: cluster_check("nodes", a, c), ("layout", "exit codes", "identical to 1 node x 2")),
    "nan": (lambda a, c: cluster_check("nan", a, c), (
        "NaN at micro-batch 1 on rank 1, seed", "exit code", "skipped updates per rank", "ranks equal")),
}


def cluster_check(name: str, args, cmds) -> list:
    from bench import cluster_faults  # imported when used: it imports this file's helpers

    return getattr(cluster_faults, name)(args, cmds)

if __name__ == "__main__":
    main()
