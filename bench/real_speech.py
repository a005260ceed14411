"""Does the recipe learn real speech? Both HuBERT iterations of the tiny model on a LibriSpeech folder, with
validation on held-out speakers and label quality scored on hand-labelled phones (docs/real_speech.md).

    R=../shared/realspeech
    python bench/real_speech.py --train-dir $R/librispeech/LibriSpeech/train-clean-100 \\
        --valid-dir $R/librispeech/LibriSpeech/test-other \\
        --phone-audio $R/timit-dev/audio --phone-alignments $R/timit-dev/alignments.tsv \\
        --out exp_real/recipe [-- extra train.py flags for both iterations]

Iteration 1 trains on MFCC k-means labels of --train-dir (train.py's tiny recipe), validating on
--valid-dir labelled with the same k-means; then k-means on every layer of the model is scored on the
phone-labelled audio (PNMI, tools/layer_quality.py) next to the MFCC labels (``--input``: the transformer's
input too, as layer 0). Iteration 2 trains a new model on k-means labels of the best iteration-1 layer and is
scored the same way. The MFCC labels are made once
per --train-dir and k (``<out>/../mfcc_<K>``) and shared by the runs.
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
from tools.heldout_quality import heldout_quality, label_folder  # noqa: E402
from tools.layer_quality import layer_quality, tsv_files  # noqa: E402
from utils.common_utils import atomic_write  # noqa: E402
from utils.curves import last, metrics_csv, plot_curves, read_metrics  # noqa: E402
from utils.feature_utils import Extractor, hubert_extractor, mfcc_extractor  # noqa: E402
from utils.label_quality import prior_accuracy  # noqa: E402

CHECKPOINT = "checkpoints_librispeech_hubert_pretrain_tiny/last.ckpt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-dir", type=Path, required=True,
                   help="training audio (every file under it: preprocess.py reads it through a link named train)")
    p.add_argument("--valid-dir", type=Path, required=True, help="held-out speakers for validation")
    p.add_argument("--phone-audio", type=Path, required=True, help="audio with phone alignments (label quality)")
    p.add_argument("--phone-alignments", type=Path, required=True, nargs="+", help="its alignments at 100 Hz")
    p.add_argument("--out", type=Path, required=True, help="this run's folder")
    p.add_argument("--num-cluster", type=int, default=100, help="k of the scoring k-means (and of the labels)")
    p.add_argument("--num-classes", type=int, default=None, help="k of the training labels (default --num-cluster)")
    p.add_argument("--iterations", type=int, choices=[1, 2], default=2)
    p.add_argument("--layer-norm", action="store_true", help="normalise each frame before the layer k-means")
    p.add_argument("--input", action="store_true",
                   help="also score the transformer's input as layer 0 (iteration 2 may then cluster it)")
    p.add_argument("--val-check-interval", type=int, default=250, help="updates between validations")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then extra train.py flags (both iterations)")
    args = p.parse_args(argv)
    args.num_classes = args.num_classes or args.num_cluster
    return args


def label_valid(data: Path, valid_dir: Path, extractor: Extractor) -> None:
    """The valid split of ``data``: every file of ``valid_dir``, labelled with ``data``'s k-means (fitted on
    train), in the file-list and label formats of preprocess.py."""
    files, num_samples, labels = label_folder(data, valid_dir, extractor)
    with atomic_write(data / "tsv" / "librispeech_valid.tsv", "w") as f:
        f.write(f"{valid_dir.resolve()}\n")
        f.writelines(f"{rel}\t{n}\n" for rel, n in zip(files, num_samples))
    with atomic_write(data / "label" / "label_valid.pt", "w") as f:
        f.writelines(" ".join(map(str, frame_labels.tolist())) + "\n" for frame_labels in labels)


def make_labels(args, exp: Path, checkpoint=None, layer=None) -> Path:
    """k-means labels of the training audio (MFCC, or ``layer`` of ``checkpoint``), and the valid split."""
    feat = ["--feat-type", "mfcc"] if checkpoint is None else [
        "--feat-type", "hubert", "--layer-index", str(layer), "--checkpoint-path", str(checkpoint)]
    root = exp / "audio"  # preprocess.py takes files with "train" in their path below --root-dir
    if not (root / "train").exists():
        root.mkdir(parents=True, exist_ok=True)
        (root / "train").symlink_to(args.train_dir.resolve())
    preprocess.main(["--root-dir", str(root), "--exp-dir", str(exp), "--num-rank", "1",
                     "--num-cluster", str(args.num_classes), "--valid-percent", "0", *feat])
    data = exp / "data" / ("mfcc" if checkpoint is None else f"hubert_{layer}")
    label_valid(data, args.valid_dir, mfcc_extractor() if checkpoint is None else
                hubert_extractor(checkpoint, layer, "cpu"))
    return data


def iteration(args, name: str, data: Path, feature_type: str, extra) -> dict:
    """Train one iteration on ``data`` and score it: accuracy over the label prior, PNMI of every layer."""
    exp, start = args.out / name, time.perf_counter()
    argv = ["--dataset-path", str(data), "--exp-dir", str(exp), "--feature-type", feature_type, "--num-classes",
            str(args.num_classes), *TINY_ON_CPU, "--val-check-interval", str(args.val_check_interval),
            "--log-every-n-steps", "10", *extra]
    # a re-run trains nothing (trained by an earlier run of this script), an interrupted run resumes
    minutes = (time.perf_counter() - start) / 60 if train.main_to_end(argv) else float("nan")
    series = read_metrics(metrics_csv(exp))
    layers = layer_quality(exp / CHECKPOINT, tsv_files(data / "tsv" / "librispeech_train.tsv"), args.phone_audio,
                           args.phone_alignments, args.num_cluster, args.layer_norm, with_input=args.input)
    accuracy, prior = last(series, "val_masked_accuracy"), prior_accuracy(data / "label" / "label_valid.pt",
                                                                         feature_type)
    return {"train_minutes": minutes, "val_masked_accuracy": accuracy, "prior_accuracy": prior,
            "ratio": accuracy / prior, "layers": layers, "best_layer": max(layers, key=lambda r: r["pnmi"]),
            "series": series}


def main(argv=None):
    args = parse_args(argv)
    extra = [f for f in args.train_flags if f != "--"]
    mfcc = make_labels(args, args.out.parent / f"mfcc_{args.num_classes}")
    result = {"flags": extra, "layer_norm": args.layer_norm, "input": args.input,
              "mfcc_pnmi": heldout_quality(mfcc, args.phone_audio, args.phone_alignments, mfcc_extractor()).pnmi}
    result["iter1"] = iteration(args, "iter1", mfcc, "mfcc", extra)
    if args.iterations == 2:
        layer = result["iter1"]["best_layer"]["layer"]
        labels = make_labels(args, args.out, args.out / "iter1" / CHECKPOINT, layer)
        result["iter2"] = iteration(args, "iter2", labels, "hubert", extra)
    runs = [name for name in ("iter1", "iter2") if name in result]
    plot_curves({name: result[name].pop("series") for name in runs}, args.out / "curves.png",
                title=f"tiny HuBERT on real speech, {args.out.name}")
    (args.out / "results.json").write_text(json.dumps(result, indent=2))

    print(f"\n{args.out.name}: MFCC k={args.num_classes} labels, PNMI on the phone-labelled audio "
          f"{result['mfcc_pnmi']:.3f}")
    print(f"{'':<6}{'train min':>10}{'val acc':>9}{'prior':>7}{'ratio':>7}  PNMI per layer (best)")
    for name in runs:
        r = result[name]
        pnmi = " ".join(f"{layer['pnmi']:.3f}" for layer in r["layers"])
        print(f"{name:<6}{r['train_minutes']:>10.1f}{r['val_masked_accuracy']:>9.3f}{r['prior_accuracy']:>7.3f}"
              f"{r['ratio']:>7.2f}  {pnmi} ({r['best_layer']['layer']})")
    return result


if __name__ == "__main__":
    main()
