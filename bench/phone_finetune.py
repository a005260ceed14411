"""Does pre-training on real speech make a better recogniser? CTC phone recognition on hand-labelled speech:
fine-tune hubert_pretrain_tiny from random weights and from each --checkpoint with the same recipe and budget,
and score the phone error rate (PER) on held-out speakers, fold by fold (docs/phone_finetune.md).

    R=../shared/realspeech
    python bench/phone_finetune.py --audio $R/timit-dev/audio --alignments $R/timit-dev/alignments.tsv \\
        --checkpoint iteration1=exp_real/F_mask5/iter1/checkpoints_librispeech_hubert_pretrain_tiny/last.ckpt \\
        --out exp_phones [-- <extra finetune.py flags>]

Transcripts are the aligned phones with repeats merged and --silence dropped, one CTC token each
(finetune.py --vocab); utterances whose id matches --exclude (TIMIT's SA sentences, which every speaker reads)
are left out. Fold k holds out speakers k, k + F, k + 2F, ... of the sorted speakers (F = --folds) and trains
on the rest. Fine-tuning is the demo's recipe (tools/demo.py FINETUNE_RECIPE); each run keeps its final
checkpoint only (--save-top-k 0). Each finished fine-tuning is kept in <out>/results.json, so an interrupted
run continues where it stopped.
"""
import argparse
import fnmatch
import itertools
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from bench.finetune_study import cpu_seconds  # noqa: E402
from tools.demo import finetune_and_score, finetune_schedule  # noqa: E402
from utils.common_utils import atomic_write  # noqa: E402
from utils.label_quality import read_alignments  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audio", type=Path, required=True, help="folder of <utt-id>.flac files (any depth)")
    p.add_argument("--alignments", type=Path, required=True, nargs="+", help="'<utt-id>\\t<phone> ...' at 100 Hz")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="a pre-trained model to fine-tune (repeatable); random weights are always run")
    p.add_argument("--out", type=Path, required=True, help="the study's folder")
    p.add_argument("--folds", type=int, default=4, help="held-out speaker groups")
    p.add_argument("--updates", type=int, default=300, help="updates of each fine-tuning")
    p.add_argument("--silence", default="sil", help="the alignments' silence phone, left out of transcripts")
    p.add_argument("--exclude", default="*-sa?", help="utterance ids to leave out (shell pattern)")
    p.add_argument("finetune_flags", nargs=argparse.REMAINDER, help="-- then extra finetune.py flags")
    args = p.parse_args(argv)
    try:
        args.checkpoint = dict(item.split("=", 1) for item in args.checkpoint)
    except ValueError:
        p.error("--checkpoint takes NAME=PATH")
    for name, path in args.checkpoint.items():
        if name == "random" or not Path(path).is_file():
            p.error(f"--checkpoint {name}={path}: " + ("the name 'random' is the baseline's" if name == "random"
                                                        else "no such file"))
    return args


def phone_transcripts(args) -> dict:
    """{utt-id: (audio path, 'PHONE PHONE ...')} of the aligned utterances that have audio and are kept."""
    audio = {path.stem: path for path in args.audio.rglob("*.flac")}
    transcripts = {}
    for utt, frames in sorted(read_alignments(args.alignments).items()):
        phones = [p for p, _ in itertools.groupby(frames) if p != args.silence]
        if utt in audio and phones and not fnmatch.fnmatch(utt, args.exclude):
            transcripts[utt] = (audio[utt], " ".join(phones))
    if not transcripts:
        raise SystemExit(f"phone_finetune.py: error: no utterance of {args.alignments} has audio in {args.audio}")
    return transcripts


def speaker(utt: str) -> str:
    return utt.split("-")[0]


def write_fold(transcripts: dict, held_out: set, corpus: Path) -> None:
    """A LibriSpeech-layout corpus (links to the audio, one transcript file per speaker) of the training and
    the held-out speakers, where tools/demo.finetune_and_score looks for them."""
    for utt, (path, phones) in transcripts.items():
        split = "dev-clean" if speaker(utt) in held_out else "train-clean-100"
        folder = corpus / "LibriSpeech" / split / speaker(utt)
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(path.resolve(), folder / f"{utt}.flac")
        with open(folder / f"{speaker(utt)}.trans.txt", "a") as f:
            f.write(f"{utt} {phones}\n")


def main(argv=None):
    args = parse_args(argv)
    extra = [f for f in args.finetune_flags if f != "--"]
    transcripts = phone_transcripts(args)
    speakers = sorted({speaker(utt) for utt in transcripts})
    if not 2 <= args.folds <= len(speakers):
        raise SystemExit(f"phone_finetune.py: error: --folds {args.folds}: {len(speakers)} speakers")
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = args.out / "phones.txt"
    with atomic_write(vocab, "w") as f:
        f.writelines(f"{p}\n" for p in sorted({p for _, text in transcripts.values() for p in text.split()}))
    u = args.updates
    flags = ["--vocab", str(vocab), "--save-top-k", "0", *finetune_schedule(u), *extra]
    results_file = args.out / "results.json"
    setup = {"updates": u, "flags": extra, "folds": args.folds, "exclude": args.exclude, "silence": args.silence}
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    runs = saved.get("runs", {}) if saved.get("setup") == setup else {}  # other settings: start afresh
    sources = {"random": ["--random-init", "--model-name", "hubert_pretrain_tiny"],
               **{name: ["--checkpoint", str(path)] for name, path in args.checkpoint.items()}}
    for fold in range(args.folds):
        held_out = set(speakers[fold::args.folds])
        corpus = args.out / f"fold{fold}" / "corpus"
        if not corpus.exists():
            tmp = corpus.with_name("corpus.tmp")
            shutil.rmtree(tmp, ignore_errors=True)  # an interrupted earlier attempt
            write_fold(transcripts, held_out, tmp)
            os.replace(tmp, corpus)
        for name, source in sources.items():
            key = f"{name}/fold{fold}"
            if key in runs:
                continue
            start = cpu_seconds()
            counts, _ = finetune_and_score(corpus, args.out / f"fold{fold}" / name, source, u, flags)
            runs[key] = {"phone_errors": counts.word_errors, "phones": counts.words, "per": counts.wer,
                         "held_out": sorted(held_out), "cpu_s": cpu_seconds() - start}
            with atomic_write(results_file, "w") as f:
                json.dump({"setup": setup, "runs": runs}, f, indent=2)

    print(f"\nphone error rate, {len(transcripts)} utterances of {len(speakers)} speakers, {args.folds} folds of "
          f"held-out speakers, {u} fine-tuning updates")
    print(f"{'initialisation':<16}" + "".join(f"{f'fold {k}':>8}" for k in range(args.folds)) + f"{'PER':>8}")
    table = {}
    for name in sources:
        folds = [runs[f"{name}/fold{k}"] for k in range(args.folds)]
        table[name] = sum(r["phone_errors"] for r in folds) / sum(r["phones"] for r in folds)
        print(f"{name:<16}" + "".join(f"{r['per']:>8.3f}" for r in folds) + f"{table[name]:>8.3f}")
    return table


if __name__ == "__main__":
    main()
