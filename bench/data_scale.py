"""train.py's data path at corpus sizes up to Libri-Light's 60 k h: start-up time and memory of one rank.

    python bench/data_scale.py                                  # 100 h, 960 h, 6 k h, 60 k h; text and npy labels
    python bench/data_scale.py --hours 100 960 --code /tmp/old  # the same, with another checkout's dataset/

What one rank of an 8-rank run builds before its first update, as lightning.py does it: HuBERTDataSet (TSV, label
file, label-count and label-range checks), BucketizeBatchSampler (1000 buckets, 87.5 s per batch, upstream's),
DistributedBatchSampler (rank 0 of 8), UpdateLoader, then the first update's plan and its labels. Each
measurement runs in a fresh process: start-up is the wall time of that; memory is the process's RSS (peak, and
after) beyond what importing torch and the packages took, and its private share (USS; file pages that only this
process maps count as private too, so for memory-mapped labels it is an upper bound of what a further rank adds).

Simulated corpora, kept in --work between runs: utterance lengths as bench/data_path.py's LibriSpeech-like ones
(281,241 utterances at 960 h, 17.6 M at 60 k h) rounded to 0.1 s, every TSV line naming the silent file of its
length (a few hundred, which the start-up check of sample counts reads) under a path as long as LibriSpeech's,
50 Hz labels of k=500 (text, and the npy pair). At 60 k h the text labels (~41 GB) do not fit this machine's disk:
text is measured up to 6 k h; the npy ids there are a sparse file (the offsets are real), which the data path
reads as it reads any: a few pages at start-up.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile

REPO = Path(__file__).resolve().parents[1]
UTTERANCES_960H = 281_241
K = 500
QUANTUM = 1600  # lengths are rounded to 0.1 s: one silent file per length


def audio_path(length: int) -> str:
    """45 characters, as "train-clean-100/103/1240/103-1240-0000.flac"."""
    return "./" * 16 + f"L{length:07d}.flac"


def utterances(hours: float) -> int:
    return round(UTTERANCES_960H * hours / 960)


def write_corpus(work: Path, hours: float, text: bool) -> Path:
    """``work/<hours>h/`` with tsv/, label/ (npy pair always, text if ``text``) and the silent audio files."""
    sys.path.insert(0, str(REPO))
    from bench.data_path import librispeech_like_lengths
    from dataset.label_files import npy_header, npy_paths, text_path

    root = work / f"{hours:g}h"
    done = root / f".done_v2_{'text' if text else 'npy'}"  # v2: real files of the listed lengths
    if done.is_file():
        return root
    for d in ("tsv", "label", "audio"):
        (root / d).mkdir(parents=True, exist_ok=True)
    n = utterances(hours)
    lengths = np.maximum(np.round(librispeech_like_lengths(n) / QUANTUM).astype(np.int64), 1) * QUANTUM
    for length in np.unique(lengths).tolist():
        soundfile.write(root / "audio" / audio_path(length), np.zeros(length, dtype=np.int16), 16000)
    counts = np.where(lengths >= 400, (lengths - 400) // 320 + 1, 0)
    with open(root / "tsv" / "librispeech_train.tsv", "w") as f:
        f.write(f"{root / 'audio'}\n")
        for block in np.array_split(lengths, max(1, n // 100_000)):
            f.write("".join(f"{audio_path(m)}\t{m}\n" for m in block.tolist()))
    ids, offsets = npy_paths(root / "label", "train")
    np.save(offsets, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    header = npy_header(np.dtype(np.uint16), int(counts.sum()))
    with open(ids, "wb") as f:
        f.write(header)
        if hours <= 6000:  # real ids; beyond, a sparse file of the same size
            rng = np.random.default_rng(0)
            for block in np.array_split(counts, max(1, n // 100_000)):
                f.write(rng.integers(0, K, int(block.sum()), dtype=np.uint16).tobytes())
        f.truncate(len(header) + 2 * int(counts.sum()))
    if text:
        write_text_labels(text_path(root / "label", "train"), counts)
    done.write_text("")
    return root


def write_text_labels(path: Path, counts: np.ndarray) -> None:
    """Lines of the right label counts cut from a pool of random formatted ids (fast; the content is noise)."""
    rng = np.random.default_rng(1)
    pool_ids = rng.integers(0, K, 4_000_000)
    pool = (" ".join(map(str, pool_ids.tolist())) + " ").encode()
    token_end = np.cumsum([len(str(i)) + 1 for i in pool_ids.tolist()])
    token_start = np.concatenate([[0], token_end[:-1]])
    with open(path, "wb") as f:
        start = 0
        for block in np.array_split(counts, max(1, len(counts) // 20_000)):
            lines = []
            for c in block.tolist():
                if start + c > len(pool_ids):
                    start = 0
                lines.append(pool[token_start[start]:token_end[start + c - 1] - 1] if c else b"")
                start += c
            f.write(b"\n".join(lines) + b"\n")


def memory() -> dict:
    """RSS, its peak since the last reset_peak() and private (USS) memory of this process, MB."""
    fields = {}
    for name in ("/proc/self/smaps_rollup", "/proc/self/status"):
        with open(name) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return {"rss": fields["Rss"], "peak": fields["VmHWM"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: VmHWM starts again from the current RSS


def child(root: Path, label_format: str, code: Path) -> None:
    """One rank's data path, measured; prints a JSON line."""
    sys.path.insert(0, str(code))
    import torch  # noqa: F401  (part of the baseline, as in train.py)

    from dataset import (BucketizeBatchSampler, CollateFnHubert, DistributedBatchSampler, HuBERTDataSet,
                         UpdateLoader)
    if label_format == "text":  # the npy pair would be preferred; hide it
        for p in (root / "label").glob("label_train*.npy"):
            p.rename(p.with_name(p.name + ".hidden"))
    reset_peak()
    base, start = memory(), time.perf_counter()
    try:
        dataset = HuBERTDataSet(root, "librispeech", "train", feature_type="hubert", num_classes=K)
        sampler = BucketizeBatchSampler(dataset.len_list, num_buckets=1000, min_len=32000, max_len=250000,
                                        max_token_count=int(87.5 * 16000), shuffle=True, seed=0)
        batches = DistributedBatchSampler(sampler, num_replicas=8, rank=0, shuffle=True, seed=0)
        loader = UpdateLoader(dataset, batches, CollateFnHubert("hubert"), accumulate=1, seed=0, rank=0)
        plan = next(iter(loader.sampler))
        labels = sum(len(dataset._load_label(i)) for i in plan.batches[0])
        seconds = time.perf_counter() - start
    finally:
        for p in (root / "label").glob("*.hidden"):
            p.rename(p.with_name(p.name[:-len(".hidden")]))
    after = memory()
    print(json.dumps({"utterances": len(dataset), "updates": len(loader.sampler), "first_update_labels": labels,
                      "startup_s": seconds, "peak_rss_mb": after["peak"] - base["rss"],
                      "rss_mb": after["rss"] - base["rss"],
                      "uss_mb": after["uss"] - base["uss"]}))


def measure(root: Path, label_format: str, code: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(root), label_format, "--code", str(code)],
                         capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, nargs="+", default=[100, 960, 6000, 60000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/data_scale"))
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose dataset/ is measured")
    parser.add_argument("--formats", nargs="+", default=["text", "npy"], choices=["text", "npy"])
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child[0]), args.child[1], args.code)
    print(f"{'hours':>7} {'utterances':>10} {'labels':>6} {'run':>9} {'start-up s':>10} {'peak RSS MB':>11} "
          f"{'RSS MB':>7} {'USS MB':>7}")
    for hours in args.hours:
        text = "text" in args.formats and hours <= 6000
        root = write_corpus(args.work, hours, text)
        for label_format in args.formats:
            if label_format == "text" and not text:
                continue
            runs = ["first", "again"] if label_format == "text" else ["first"]
            for run in runs:  # text: the first start builds and caches the line index, the next reads it
                if run == "first":
                    for cache in (root / "label").glob("*.index.npz"):
                        cache.unlink()
                r = measure(root, label_format, args.code)
                if "error" in r:
                    print(f"{hours:>7g} {utterances(hours):>10} {label_format:>6} {run:>9} {r['error']}")
                    continue
                print(f"{hours:>7g} {r['utterances']:>10} {label_format:>6} {run:>9} {r['startup_s']:>10.1f} "
                      f"{r['peak_rss_mb']:>11.0f} {r['rss_mb']:>7.0f} {r['uss_mb']:>7.0f}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
