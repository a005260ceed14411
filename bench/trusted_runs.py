"""Trusted runs: a recipe trained over several seeds, kept small as the default reference of tools/report.py
and of `make demo` (health/trusted.py), and the spread of its figures for the README.

    python bench/trusted_runs.py --recipe demo --seeds 1 2 3 4 5 [--work /tmp/trusted]
    python bench/trusted_runs.py --recipe tiny --seeds 1 2 3 4 5 [--work /tmp/trusted]

demo: tools/demo.py --seed S (both pre-training iterations, both CTC fine-tunings). tiny: train.py's tiny recipe
(iteration 1 on MFCC labels, 2,300 updates) on the tiny study's 40-minute corpus, via bench/tiny_study.py
(docs/tiny_study.md). Each seed runs in its own process; a seed whose figures exist in --work is not trained
again. Every seed's runs are copied into health/trusted/<recipe>/seed_S/ (the metrics the report draws, the
recipe's flags, figures.json: a few tens of kB per seed); then a table of each figure over the seeds.
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: the repo's packages
from health.history import read_run  # noqa: E402
from health.trusted import TRUSTED, interval, machine, save_trusted  # noqa: E402

DEMO_RUNS = ("iter1", "iter2", "finetune_iter2", "finetune_random")
STUDY_CORPUS = ["--minutes", "40", "--train-speakers", "40", "--dev-speakers", "8"]  # docs/tiny_study.md


def run(*cmd) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([sys.executable, *map(str, cmd)], check=True, cwd=REPO)


def demo_seed(work: Path, seed: int) -> dict:
    out = work / "demo" / f"seed_{seed}"
    if not (out / "figures.json").is_file():
        run("tools/demo.py", "--out", out, "--seed", seed)
    figures = json.loads((out / "figures.json").read_text())
    dest = TRUSTED / "demo" / f"seed_{seed}"
    for name in DEMO_RUNS:
        iteration = {"iter1": "iteration 1", "iter2": "iteration 2"}.get(name)
        prior = figures["figures"][iteration]["label_prior"] if iteration else float("nan")
        save_trusted(read_run(out / name), dest / name, prior)
    return figures


def tiny_seed(work: Path, seed: int) -> dict:
    corpus, out = work / "study_data", work / "tiny" / f"seed_{seed}"
    if not (corpus / "LibriSpeech").is_dir():
        run("tools/make_demo_corpus.py", "--out", corpus, *STUDY_CORPUS)
    if not (out / "results.json").is_file():
        run("bench/tiny_study.py", "--corpus", corpus, "--out", out, "--", "--seed", seed)
    result = json.loads((out / "results.json").read_text())
    prior = result["prior_accuracy"]
    figures = {"seed": seed, "machine": machine(), "figures": {"iteration 1": dict(
        val_masked_accuracy=result["val_masked_accuracy"], label_prior=prior,
        ratio=result["val_masked_accuracy"] / prior, pnmi_heldout_best_layer=result["best_layer"]["pnmi"],
        pnmi_heldout_mfcc=result["mfcc_pnmi"], train_minutes=result["train_minutes"])}}
    save_trusted(read_run(out), TRUSTED / "tiny" / f"seed_{seed}" / "iter1", prior)
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=("demo", "tiny"), required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--work", type=Path, default=Path("/tmp/trusted"), help="the full runs (GBs: delete after)")
    args = p.parse_args(argv)
    shutil.rmtree(TRUSTED / args.recipe, ignore_errors=True)  # the reference is exactly these seeds
    seeds = []
    for seed in args.seeds:
        figures = (demo_seed if args.recipe == "demo" else tiny_seed)(args.work, seed)
        (TRUSTED / args.recipe / f"seed_{seed}" / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
        seeds.append(figures)
    print(f"\n{args.recipe}: {len(seeds)} seeds ({', '.join(map(str, args.seeds))}) on {machine()}")
    print(f"{'figure':<50} {'mean':>7} {'sd':>6} {'min':>7} {'max':>7} {'99% interval':>15}")
    for run_name, values in seeds[0]["figures"].items():
        for name in values:
            column = [s["figures"][run_name][name] for s in seeds]
            lo, hi = interval(column) if len(column) > 1 else (column[0], column[0])
            sd = statistics.stdev(column) if len(column) > 1 else 0.0
            print(f"{run_name + ' ' + name:<50} {statistics.mean(column):>7.3f} {sd:>6.3f} {min(column):>7.3f} "
                  f"{max(column):>7.3f} {lo:>7.3f}-{hi:<7.3f}")


if __name__ == "__main__":
    main()
