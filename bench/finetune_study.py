"""Is pre-training worth it? Fine-tune ``hubert_pretrain_tiny`` with CTC on a synthetic corpus's training
transcripts from (a) random initialisation, (b) iteration 1 and (c) iteration 2 of our CPU recipe, with the same
settings and budget, and measure the character error rate on the held-out (dev-clean) speakers
(docs/finetune_study.md).

    python tools/make_demo_corpus.py --out study_data --minutes 40 --train-speakers 40 --dev-speakers 8
    python bench/finetune_study.py --corpus study_data --out exp_ft_study [-- <extra finetune.py flags>]

Pre-training is bench/tiny_study.py's recipe (train.py's tiny recipe, 2,300 updates; MFCC k=100 labels, then
k-means k=100 of iteration 1's layer --layer-index); fine-tuning is the demo's (tools/demo.py FINETUNE_RECIPE)
for --finetune-updates (docs/finetune_study.md: CER 1.000 / 0.374 / 0.321 from random / iteration 1 / 2). A
pre-training iteration whose checkpoint is complete is skipped and an interrupted one resumes from its last.ckpt,
so the command can be run again after an interruption; the fine-tunings always run.
"""
import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
import preprocess  # noqa: E402
import train  # noqa: E402
from bench.tiny_study import RECIPE as PRETRAIN_RECIPE  # noqa: E402
from tools.demo import finetune_and_score  # noqa: E402
from utils.curves import FINETUNING_PANELS, plot_curves  # noqa: E402

CKPT = "checkpoints_librispeech_hubert_pretrain_tiny/last.ckpt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, required=True, help="made by tools/make_demo_corpus.py")
    p.add_argument("--out", type=Path, required=True, help="the study's folder")
    p.add_argument("--num-cluster", type=int, default=100, help="k of the MFCC and the layer k-means")
    p.add_argument("--layer-index", type=int, default=4, help="iteration-1 layer that makes iteration 2's labels")
    recipe_updates = train.RECIPES["hubert_pretrain_tiny"]["max_updates"]
    p.add_argument("--pretrain-updates", type=int, nargs=2, default=(recipe_updates, recipe_updates),
                   metavar=("ITER1", "ITER2"), help=f"updates of each pre-training iteration ({recipe_updates})")
    p.add_argument("--finetune-updates", type=int, default=300, help="updates of each fine-tuning run")
    p.add_argument("finetune_flags", nargs=argparse.REMAINDER, help="-- then extra finetune.py flags")
    return p.parse_args(argv)


def pretrain(args, feature_type: str, data: Path, exp: Path, updates: int) -> Path:
    """One pre-training iteration, resumed from its last.ckpt if it was interrupted."""
    train.main_to_end(["--dataset-path", str(data), "--exp-dir", str(exp), "--feature-type", feature_type,
                       "--num-classes", str(args.num_cluster), *PRETRAIN_RECIPE, "--max-updates", str(updates)])
    return exp / CKPT


def labels(args, checkpoint=None) -> Path:
    feat = ["--feat-type", "mfcc"] if checkpoint is None else [
        "--feat-type", "hubert", "--layer-index", str(args.layer_index), "--checkpoint-path", str(checkpoint)]
    preprocess.main(["--root-dir", str((args.corpus / "LibriSpeech").resolve()), "--exp-dir", str(args.out / "labels"),
                     "--num-cluster", str(args.num_cluster), "--num-rank", "1", "--valid-percent", "0.05", *feat])
    return args.out / "labels" / "data" / ("mfcc" if checkpoint is None else f"hubert_{args.layer_index}")


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the data-loader workers)."""
    return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))


def fine_tune(args, name: str, source: list, extra: list) -> dict:
    start = cpu_seconds()
    counts, series = finetune_and_score(args.corpus, args.out / f"ft_{name}", source, args.finetune_updates, extra)
    return {"name": name, "cer": counts.cer, "wer": counts.wer, "cpu_s": cpu_seconds() - start, "series": series}


def main(argv=None):
    args = parse_args(argv)
    extra = [f for f in args.finetune_flags if f != "--"]
    iter1 = pretrain(args, "mfcc", labels(args), args.out / "iter1", args.pretrain_updates[0])
    iter2 = pretrain(args, "hubert", labels(args, iter1), args.out / "iter2", args.pretrain_updates[1])
    runs = [fine_tune(args, "random", ["--random-init", "--model-name", "hubert_pretrain_tiny"], extra),
            fine_tune(args, "iter1", ["--checkpoint", str(iter1)], extra),
            fine_tune(args, "iter2", ["--checkpoint", str(iter2)], extra)]
    png = plot_curves({r["name"]: r["series"] for r in runs}, args.out / "finetune_curves.png",
                      title="CTC fine-tuning of tiny HuBERT", panels=FINETUNING_PANELS)
    for r in runs:
        r["val_cer"] = r.pop("series").get("val_cer", [])
    (args.out / "results.json").write_text(json.dumps({"flags": extra, "runs": runs}, indent=2))
    print(f"\n{'initialisation':<16}{'held-out CER':>13}{'WER':>7}{'CPU s':>8}")
    for r in runs:
        print(f"{r['name']:<16}{r['cer']:>13.3f}{r['wer']:>7.3f}{r['cpu_s']:>8.0f}")
    print(f"curves: {png}")
    return runs


if __name__ == "__main__":
    main()
