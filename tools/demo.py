"""The whole recipe on the embedded demo corpus, on CPU, in under 10 minutes on 2 cores (`make demo`).

MFCC labels -> iteration 1 -> labels from an iteration-1 layer -> iteration 2, with the tiny model and
our CPU recipe (docs/tiny_study.md), then CTC fine-tuning of iteration 2 on the training speakers'
transcripts, next to the same fine-tuning from random weights (docs/finetune_study.md). Ends with two tables
(per iteration: masked accuracy, label PNMI against the demo's phone alignments, where checkpoints and logs
are; per fine-tuning: character error rate on the held-out speakers), PNGs of the curves, figures.json, and
whether its figures lie in the band of the trusted seeds (health/trusted/demo, docs/trusted_runs.md).

    python tools/demo.py [--out exp_demo] [--corpus demo_data] [--seed 1337]
"""
import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: the repo's packages
import finetune  # noqa: E402
import preprocess  # noqa: E402
import train  # noqa: E402
from evaluate import evaluate_folder  # noqa: E402
from health.trusted import band_verdict, machine, seeds_figures  # noqa: E402
from tools.heldout_quality import heldout_quality  # noqa: E402
from utils.checkpoint import load_finetuned_model  # noqa: E402
from utils.common_utils import atomic_write  # noqa: E402
from utils.ctc import greedy_decode  # noqa: E402
from utils.curves import FINETUNING_PANELS, last, metrics_csv, plot_curves, read_metrics  # noqa: E402
from utils.feature_utils import hubert_extractor, mfcc_extractor  # noqa: E402
from utils.label_quality import measure, prior_accuracy  # noqa: E402

# The tiny model on this machine's CPU; train.py gives it its own recipe (lr, batch, loss weights).
TINY_ON_CPU = ["--model-name", "hubert_pretrain_tiny", "--accelerator", "cpu", "--devices", "1", "--num-workers", "1"]
# CTC fine-tuning of the tiny model on minutes of speech (docs/finetune_study.md); finetune.py's defaults stay
# upstream's (Base, LibriLight 10 h).
FINETUNE_RECIPE = ["--accelerator", "cpu", "--devices", "1", "--num-workers", "1", "--seconds-per-batch", "16",
                   "--learning-rate", "1e-3", "--freeze-encoder-updates", "20", "--warmup-updates", "20",
                   "--hold-updates", "1000", "--decay-updates", "100", "--mask-prob", "0", "--mask-channel-prob", "0",
                   "--encoder-layer-drop", "0", "--val-check-interval", "25", "--log-every-n-steps", "5"]


# The figures the demo checks against its trusted runs' band: those that seeds move little (docs/trusted_runs.md;
# iteration 2's ratio spans 1.9-3.5 over 5 seeds: its labels, hence their prior, change with the seed).
BAND_FIGURES = [("iteration 1", "ratio"), ("iteration 2", "pnmi_heldout"), ("fine-tuning from iteration 2", "cer")]


def finetune_schedule(updates: int) -> list:
    """FINETUNE_RECIPE's hold and decay for ``updates``: warm-up 20, then the last fifth decays (the runs
    docs/finetune_study.md measured for 150 updates)."""
    return ["--hold-updates", str(max(0, updates - 20 - updates // 5)), "--decay-updates", str(max(1, updates // 5))]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "exp_demo", help="everything the demo writes")
    p.add_argument("--corpus", type=Path, default=REPO / "demo_data", help="made by tools/make_demo_corpus.py")
    p.add_argument("--updates", type=int, nargs=2, default=(600, 250), metavar=("ITER1", "ITER2"),
                   help="optimizer updates of each iteration")
    p.add_argument("--num-cluster", type=int, default=100, help="k of both k-means")
    p.add_argument("--layer-index", type=int, default=4, help="iteration-1 layer that makes iteration 2's labels")
    p.add_argument("--finetune-updates", type=int, default=150, help="optimizer updates of each CTC fine-tuning")
    p.add_argument("--seed", type=int, default=1337, help="train.py's and finetune.py's --seed (k-means keep theirs)")
    return p.parse_args(argv)


def make_labels(args, exp: Path, checkpoint=None) -> Path:
    feat = ["--feat-type", "mfcc"] if checkpoint is None else [
        "--feat-type", "hubert", "--layer-index", str(args.layer_index), "--checkpoint-path", str(checkpoint)]
    preprocess.main(["--root-dir", str((args.corpus / "LibriSpeech").resolve()), "--exp-dir", str(exp),
                     "--num-cluster", str(args.num_cluster), "--num-rank", "1", "--valid-percent", "0.1", *feat])
    return exp / "data" / ("mfcc" if checkpoint is None else f"hubert_{args.layer_index}")


def pretrain(args, data: Path, exp: Path, feature_type: str, updates: int) -> Path:
    train.main(["--dataset-path", str(data), "--exp-dir", str(exp), "--feature-type", feature_type,
                "--num-classes", str(args.num_cluster), "--max-updates", str(updates),
                "--warmup-updates", str(max(1, updates // 10)), "--val-check-interval", str(max(1, updates // 5)),
                "--log-every-n-steps", "5", "--seed", str(args.seed), *TINY_ON_CPU,
                "--resume-checkpoint", "none"])  # a re-run of the demo trains afresh
    return exp / "checkpoints_librispeech_hubert_pretrain_tiny" / "last.ckpt"


def finetune_and_score(corpus: Path, exp: Path, source: list, updates: int, extra=()):
    """CTC fine-tuning of ``source`` (finetune.py's --checkpoint or --random-init flags) on the corpus's training
    transcripts, then greedy decoding of its held-out (dev-clean) speakers one utterance at a time:
    (ErrorCounts, the run's metrics series)."""
    dev = corpus / "LibriSpeech" / "dev-clean"
    finetune.main([*source, "--train-dir", str(corpus / "LibriSpeech" / "train-clean-100"), "--valid-dir", str(dev),
                   "--exp-dir", str(exp), *FINETUNE_RECIPE, "--max-updates", str(updates), *extra])
    model, vocab = load_finetuned_model(exp / "checkpoints_hubert_pretrain_tiny" / "last.ckpt")
    counts, _ = evaluate_folder(model.eval(), dev, lambda log_probs: greedy_decode(log_probs, vocab=vocab), "cpu",
                                vocab)
    return counts, read_metrics(metrics_csv(exp))


def label_pnmi(args, data: Path, extractor):
    """PNMI of the training labels, and of the same k-means on the held-out (dev-clean) speakers."""
    alignments = sorted((args.corpus / "alignments").glob("*.tsv"))
    seen = measure(data / "tsv" / "librispeech_train.tsv", data / "label" / "label_train.pt", alignments)
    unseen = heldout_quality(data, args.corpus / "LibriSpeech" / "dev-clean",
                             [args.corpus / "alignments" / "dev-clean.tsv"], extractor)
    return seen.pnmi, unseen.pnmi


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    labels1 = make_labels(args, args.out)
    ckpt1 = pretrain(args, labels1, args.out / "iter1", "mfcc", args.updates[0])
    labels2 = make_labels(args, args.out, checkpoint=ckpt1)
    ckpt2 = pretrain(args, labels2, args.out / "iter2", "hubert", args.updates[1])
    u = args.finetune_updates
    finetuned = [(name, *finetune_and_score(args.corpus, args.out / f"finetune_{tag}", source, u,
                                            [*finetune_schedule(u), "--seed", str(args.seed)]))
                 for name, tag, source in (("iteration 2", "iter2", ["--checkpoint", str(ckpt2)]),
                                           ("random init", "random", ["--random-init", "--model-name",
                                                                      "hubert_pretrain_tiny"]))]

    rows = []
    for name, exp, data, labels, feature_type, extractor in (
            ("iteration 1", args.out / "iter1", labels1, "MFCC k-means", "mfcc", mfcc_extractor()),
            ("iteration 2", args.out / "iter2", labels2, f"iter-1 layer {args.layer_index} k-means", "hubert",
             hubert_extractor(ckpt1, args.layer_index, "cpu"))):
        series = read_metrics(metrics_csv(exp))
        rows.append((name, labels, *label_pnmi(args, data, extractor), last(series, "val_masked_accuracy"),
                     prior_accuracy(data / "label" / "label_valid.pt", feature_type),
                     exp / "checkpoints_librispeech_hubert_pretrain_tiny", exp / "lightning_logs", series))
    png = plot_curves({r[0]: r[-1] for r in rows}, args.out / "curves.png", title="demo: tiny HuBERT, 2 iterations")
    ft_png = plot_curves({name: series for name, _, series in finetuned}, args.out / "finetune_curves.png",
                         title="demo: CTC fine-tuning of tiny HuBERT", panels=FINETUNING_PANELS)

    print(f"\nHuBERT demo done in {(time.perf_counter() - start) / 60:.1f} min")
    print(f"{'':<12} {'labels':<24} {'PNMI train':>10} {'PNMI held-out':>13} {'val masked acc':>14} "
          f"{'label prior':>11} {'ratio':>5}")
    for name, labels, pnmi_seen, pnmi_unseen, acc, prior, *_ in rows:
        print(f"{name:<12} {labels:<24} {pnmi_seen:>10.3f} {pnmi_unseen:>13.3f} {acc:>14.3f} {prior:>11.3f} "
              f"{acc / prior:>5.1f}")
    print("PNMI held-out: the labels of speakers that neither k-means nor training saw; "
          "ratio: masked accuracy / accuracy of always guessing the commonest label")
    for name, *_, ckpts, logs, _ in rows:
        print(f"{name}: checkpoints {ckpts}, logs {logs}")
    print(f"\nCTC fine-tuning, {args.finetune_updates} updates on the training speakers' transcripts; greedy decoding "
          f"of the held-out speakers")
    print(f"{'from':<12} {'held-out CER':>12} {'WER':>6}")
    for name, counts, _ in finetuned:
        print(f"{name:<12} {counts.cer:>12.3f} {counts.wer:>6.3f}")
    (_, pretrained, _), (_, scratch, _) = finetuned
    print(f"pre-training {'lowers' if pretrained.cer < scratch.cer else 'does NOT lower'} the held-out CER by "
          f"{scratch.cer - pretrained.cer:.3f} ({scratch.cer:.3f} -> {pretrained.cer:.3f})")
    print(f"fine-tuned: checkpoints {args.out}/finetune_{{iter2,random}}/checkpoints_hubert_pretrain_tiny, "
          f"evaluate: python evaluate.py --checkpoint .../last.ckpt --data-dir {args.corpus}/LibriSpeech/dev-clean")
    print(f"curves: {png}, {ft_png}")
    figures = {name: dict(pnmi_train=seen, pnmi_heldout=unseen, val_masked_accuracy=acc, label_prior=prior,
                          ratio=acc / prior) for name, _, seen, unseen, acc, prior, *_ in rows}
    figures.update({f"fine-tuning from {name}": dict(cer=counts.cer, wer=counts.wer) for name, counts, _ in finetuned})
    with atomic_write(args.out / "figures.json", "w") as f:
        json.dump(dict(seed=args.seed, machine=machine(), figures=figures), f, indent=1)
    seeds = seeds_figures("demo")
    defaults = parse_args(["--out", str(args.out), "--seed", str(args.seed)])
    if vars(args) != vars(defaults):
        print("\nnot compared with the trusted runs: they were made with the default flags")
    elif len(seeds) >= 2:
        print(f"\nagainst the trusted runs (health/trusted/demo, seeds {', '.join(str(s['seed']) for s in seeds)}):")
        print("\n".join(band_verdict(figures, seeds, BAND_FIGURES)))
    return rows, finetuned


if __name__ == "__main__":
    main()
