"""Does a CPU-scale HuBERT learn? Train ``hubert_pretrain_tiny`` (iteration 1, MFCC labels) on a synthetic
corpus, then measure the two figures of the tiny-model study (docs/tiny_study.md):

1. validation masked accuracy against the label-prior accuracy (always guessing the most frequent label);
2. PNMI of k-means labels on each transformer layer against the MFCC labels' PNMI, both on the corpus's
   held-out (dev-clean) speakers, which neither training nor k-means saw.

    python tools/make_demo_corpus.py --out study_data --minutes 40 --train-speakers 40 --dev-speakers 8
    python bench/tiny_study.py --corpus study_data --out exp_study/winner -- <extra train.py flags>

The MFCC labels are made once per corpus (``<out>/../mfcc_<K>``) and shared by the runs.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
import preprocess  # noqa: E402
import train  # noqa: E402
from tools.demo import TINY_ON_CPU  # noqa: E402
from tools.heldout_quality import heldout_quality  # noqa: E402
from tools.layer_quality import layer_quality, tsv_files  # noqa: E402
from utils.curves import last, metrics_csv, plot_curves, read_metrics  # noqa: E402
from utils.feature_utils import mfcc_extractor  # noqa: E402
from utils.label_quality import prior_accuracy  # noqa: E402

# The winning run: train.py's tiny recipe (2,500 updates); flags after "--" are appended and win.
RECIPE = [*TINY_ON_CPU, "--val-check-interval", "250", "--log-every-n-steps", "10"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, required=True, help="made by tools/make_demo_corpus.py")
    p.add_argument("--out", type=Path, required=True, help="this run's folder")
    p.add_argument("--num-cluster", type=int, default=100, help="k of the MFCC and the layer k-means")
    p.add_argument("--valid-percent", type=float, default=0.05)
    p.add_argument("--eval-only", action="store_true", help="measure an existing run in --out")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then extra train.py flags")
    return p.parse_args(argv)


def mfcc_labels(corpus: Path, work: Path, k: int, valid_percent: float) -> Path:
    preprocess.main(["--root-dir", str((corpus / "LibriSpeech").resolve()), "--exp-dir", str(work),
                     "--feat-type", "mfcc", "--num-cluster", str(k), "--num-rank", "1",
                     "--valid-percent", str(valid_percent)])
    return work / "data" / "mfcc"


def main(argv=None):
    args = parse_args(argv)
    extra = [f for f in args.train_flags if f != "--"]
    data = mfcc_labels(args.corpus, args.out.parent / f"mfcc_{args.num_cluster}", args.num_cluster,
                       args.valid_percent)
    start = time.perf_counter()
    if not args.eval_only:
        train.main(["--dataset-path", str(data), "--exp-dir", str(args.out), "--feature-type", "mfcc",
                    "--num-classes", str(args.num_cluster), *RECIPE, "--resume-checkpoint", "none", *extra])
    minutes = (time.perf_counter() - start) / 60
    series = read_metrics(metrics_csv(args.out))
    plot_curves({args.out.name: series}, args.out / "curves.png", title=f"tiny HuBERT, {args.out.name}")
    mfcc = heldout_quality(data, args.corpus / "LibriSpeech" / "dev-clean",
                           [args.corpus / "alignments" / "dev-clean.tsv"], mfcc_extractor())
    checkpoint = args.out / "checkpoints_librispeech_hubert_pretrain_tiny" / "last.ckpt"
    layers = layer_quality(checkpoint, tsv_files(data / "tsv" / "librispeech_train.tsv"),
                           args.corpus / "LibriSpeech" / "dev-clean", [args.corpus / "alignments" / "dev-clean.tsv"],
                           args.num_cluster)
    best = max(layers, key=lambda r: r["pnmi"])
    updates = max((step for points in series.values() for step, _ in points), default=-1) + 1
    result = {
        "flags": extra, "train_minutes": minutes, "updates": updates,
        "val_masked_accuracy": last(series, "val_masked_accuracy"),
        "prior_accuracy": prior_accuracy(data / "label" / "label_valid.pt", "mfcc"),
        "val_loss": last(series, "val_loss"), "mfcc_pnmi": mfcc.pnmi, "layers": layers, "best_layer": best,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    ratio = result["val_masked_accuracy"] / result["prior_accuracy"]
    print(f"\n{args.out.name}: {result['updates']} updates in {minutes:.1f} min")
    print(f"{'figure':<44}{'value':>8}{'goal':>16}")
    print(f"{'val masked accuracy / label-prior accuracy':<44}{ratio:>8.2f}{'>= 3':>16}")
    print(f"{'held-out PNMI, best layer (' + str(best['layer']) + ')':<44}{best['pnmi']:>8.3f}"
          f"{'> MFCC ' + format(mfcc.pnmi, '.3f'):>16}")
    return result


if __name__ == "__main__":
    main()
