"""Tested stacks: the whole test suite on the lowest and on the highest versions that requirements.txt allows.

    python bench/stacks.py                    # both ends, then the table
    python bench/stacks.py --stack lowest     # one end
    python bench/stacks.py --table            # the table of the results already there

Each stack gets a venv of its own, .stacks/<name>/ (a few GB: the PyTorch wheels). First the stack's torch
alone, as a platform provides it (an Intel Gaudi container, a cluster's module); then README's install commands
(`python tools/keep_torch.py > keep-torch.txt; pip install -r requirements.txt -c keep-torch.txt`) as a dry run
must keep that torch and pick the stack's torchaudio for it (read from pip's JSON report); then the
requirements installed with the stack's versions (bench/stacks/<name>.txt). Then the two pytest runs of `make test`, timed. Each stack's result goes to
.stacks/<name>/result.json; the table (versions, keeps torch, passed/failed, minutes) is BENCHMARKS.md's
"Tested stacks".
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STACKS = REPO / "bench" / "stacks"
WORK = REPO / ".stacks"
CORE = ("torch", "torchaudio", "pytorch-lightning", "numpy", "scikit-learn")
# make test's two runs: the suite, then the numerics tests again on torch's generic CPU kernels.
SUITE_RUNS = (("suite", {}, []), ("numerics (default CPU kernels)", {"ATEN_CPU_CAPABILITY": "default"}, ["-m", "numerics"]))


def pins(name: str) -> dict:
    """The ``name==version`` lines of bench/stacks/<name>.txt."""
    lines = (STACKS / f"{name}.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def pip(python: Path, *args, **kwargs) -> subprocess.CompletedProcess:
    print("+ pip", " ".join(args), flush=True)
    return subprocess.run([str(python), "-m", "pip", *args], check=True, cwd=REPO, **kwargs)


def installed(python: Path) -> dict:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], check=True, text=True,
                         capture_output=True).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(out)}


def kept_torch(python: Path, work: Path, torchaudio: str) -> bool:
    """Whether README's install command, in an environment with only a platform's torch, keeps that torch and
    adds the torchaudio made for it."""
    keep = work / "keep-torch.txt"
    keep.write_text(subprocess.run([str(python), "tools/keep_torch.py"], cwd=REPO, check=True, capture_output=True,
                                   text=True).stdout)
    report = work / "dry_run.json"
    pip(python, "install", "-q", "--dry-run", "--report", str(report), "-r", "requirements.txt", "-c", str(keep))
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    print("the dry run would install:", ", ".join(f"{n} {v}" for n, v in sorted(chosen.items())), flush=True)
    return "torch" not in chosen and chosen.get("torchaudio") == torchaudio


def counts(output: str) -> dict:
    """pytest's closing line as numbers: {'passed': 391, 'failed': 2, ...}."""
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return {word.rstrip("s") if word == "errors" else word: int(n)
            for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", tail)}


def run_suite(python: Path, work: Path) -> list:
    runs = []
    for label, extra_env, args in SUITE_RUNS:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **extra_env}
        start = time.monotonic()
        proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO,
                              env=env, text=True, capture_output=True)
        minutes = (time.monotonic() - start) / 60
        log = work / f"pytest_{len(runs)}.log"
        log.write_text(proc.stdout + proc.stderr)
        runs.append({"run": label, "minutes": round(minutes, 1), "returncode": proc.returncode,
                     "log": str(log.relative_to(REPO)), **counts(proc.stdout)})
        print(f"{label}: {runs[-1]}", flush=True)
    return runs


def build_and_test(name: str) -> dict:
    work = WORK / name
    python = work / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(work)], check=True)
    versions = pins(name)
    pip(python, "install", "-q", f"torch=={versions['torch']}")
    keeps = kept_torch(python, work, versions["torchaudio"])
    pip(python, "install", "-q", "-r", "requirements-dev.txt", "-c", str(STACKS / f"{name}.txt"))
    have = installed(python)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    result = {"stack": name, "commit": commit.strip(), "python": sys.version.split()[0], "keeps_torch": keeps,
              "versions": {p: have.get(p) for p in CORE}, "runs": run_suite(python, work)}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    return result


def table(results: list) -> str:
    lines = ["| stack | commit | " + " | ".join(CORE) + " | Python | keeps an installed torch | suite | numerics "
             "(default kernels) | minutes |", "|" + "---|" * (len(CORE) + 7)]
    for r in results:
        suite = [", ".join(f"{run.get(k, 0)} {k}" for k in ("passed", "failed", "skipped", "error")
                           if k in ("passed", "failed") or run.get(k)) for run in r["runs"]]
        minutes = " + ".join(str(run["minutes"]) for run in r["runs"])
        lines.append(f"| {r['stack']} | {r.get('commit', '-')} | " + " | ".join(r["versions"][p] or "-" for p in CORE)
                     + f" | {r['python']} | {'yes' if r['keeps_torch'] else 'NO'} | " + " | ".join(suite)
                     + f" | {minutes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", choices=("lowest", "highest"), action="append",
                   help="the stack(s) to build and test (default: both)")
    p.add_argument("--table", action="store_true", help="only print the table of the results in .stacks/")
    args = p.parse_args(argv)
    names = args.stack or ["lowest", "highest"]
    if args.table:
        results = [json.loads((WORK / n / "result.json").read_text()) for n in names
                   if (WORK / n / "result.json").is_file()]
    else:
        results = [build_and_test(n) for n in names]
    print(table(results))
    ok = all(r["keeps_torch"] and all(run["returncode"] == 0 for run in r["runs"]) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
