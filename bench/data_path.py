"""The data path: loader throughput, batch padding and shapes, and preprocessing throughput.

    python bench/data_path.py                     # all three sections, a few minutes on 2 cores
    python bench/data_path.py --sections padding --utterances 281241    # 960 h-sized length list

1. loader: FLAC decoding + HuBERTDataSet + CollateFnHubert + BucketizeBatchSampler through a DataLoader
   with 0, 1, 2 workers, on a generated corpus (noise FLACs, LibriSpeech-like lengths, MFCC-rate labels).
2. padding: what the collate makes of an epoch (dataset.loader_stats, from lengths only) with the Habana
   README settings (10 buckets, 350 s) and upstream's (1000 buckets, 87.5 s), per --align-buckets mode.
   ``none`` crops every batch to its shortest utterance (audio thrown away), ``bucket1``/``bucket2`` pad.
3. preprocess: MFCC extraction (single thread, on decoded audio) in audio hours per CPU-minute, and
   k-means label prediction (utils.kmeans.predict) in frames per second. CPU time, not wall time, so
   other jobs on the machine do not distort it.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from dataset import BucketizeBatchSampler, CollateFnHubert, HuBERTDataSet, loader_stats  # noqa: E402
from utils.feature_utils import load_audio, mfcc_extractor  # noqa: E402
from utils.kmeans import predict  # noqa: E402

SAMPLE_RATE = 16000
HABANA = dict(num_buckets=10, seconds_per_batch=350.0, shuffle=False)  # README iteration 1
UPSTREAM = dict(num_buckets=1000, seconds_per_batch=87.5, shuffle=True)  # torchaudio v2.0.1 (32 GPUs)


def librispeech_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Deterministic stand-in for LibriSpeech training utterance lengths, in samples: 70 % around 14-15 s
    (10-24.5 s), 30 % a tail down to 1.5 s; mean ~12.7 s as train-clean-100 (28539 utterances, 100.6 h).
    Not the real histogram: its shape only (mostly 10-16 s, some over the 15.625 s cut, a short tail)."""
    rng = np.random.default_rng(seed)
    body = rng.normal(14.3, 1.3, n).clip(10.0, 24.5)
    tail = 1.5 + 12.5 * rng.beta(2.0, 1.2, n)
    seconds = np.where(rng.random(n) < 0.7, body, tail)
    return (seconds * SAMPLE_RATE).astype(np.int64)


def write_corpus(root: Path, lengths, seed: int = 0) -> Path:
    """Noise FLACs plus ``tsv/librispeech_train.tsv`` and 100 Hz ``label/label_train.pt`` in preprocess.py's
    format; returns the data folder for HuBERTDataSet. Noise, because the loader's cost is decoding and
    copying, not content (noise decodes a little slower than speech: a conservative figure)."""
    rng = np.random.default_rng(seed)
    audio, data = root / "audio" / "train", root / "data"
    for d in (audio, data / "tsv", data / "label"):
        d.mkdir(parents=True, exist_ok=True)
    tsv, labels = [str(root / "audio")], []
    for i, n in enumerate(int(x) for x in lengths):
        sf.write(audio / f"{i:05d}.flac", (0.1 * rng.standard_normal(n)).astype(np.float32), SAMPLE_RATE)
        tsv.append(f"train/{i:05d}.flac\t{n}")
        labels.append(" ".join(map(str, rng.integers(0, 100, (n - 400) // 160 + 1))))
    (data / "tsv" / "librispeech_train.tsv").write_text("\n".join(tsv) + "\n")
    (data / "label" / "label_train.pt").write_text("\n".join(labels) + "\n")
    return data


def make_loader(dataset, align: str, seconds_per_batch: float, workers: int) -> DataLoader:
    """The training loader as lightning.py builds it (Habana: shuffle=False), for ``align`` mode."""
    sampler = BucketizeBatchSampler(dataset.len_list, num_buckets=10, min_len=32000, max_len=250000,
                                    max_token_count=seconds_per_batch * SAMPLE_RATE, shuffle=False,
                                    align_buckets=align)
    pad = align != "none"
    aligner = sampler.gen_bucket_boundary_fn() if pad else None
    collate = CollateFnHubert("mfcc", pad=pad, rand_crop=True, aligner=aligner)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)


def time_loader(loader) -> dict:
    """One pass: time to the first batch (worker start-up) and the rate over the whole pass."""
    lengths = loader.dataset.len_list
    start = time.perf_counter()
    first, batches = None, 0
    for _ in loader:
        batches += 1
        if first is None:
            first = time.perf_counter() - start
    wall = time.perf_counter() - start
    audio = sum(int(lengths[i]) for b in loader.batch_sampler for i in b) / SAMPLE_RATE  # decoded audio
    return dict(first=first, wall=wall, batches=batches, audio=audio)


def loader_section(args, data) -> list:
    """One thread in the main process too, as DataLoader gives each worker: num_workers=0 is one worker's
    work done inline, not a process with more threads than a worker."""
    torch.set_num_threads(1)
    dataset = HuBERTDataSet(data, "librispeech", "train", feature_type="mfcc")
    rows = []
    for align in args.aligns:
        for workers in args.workers:
            torch.manual_seed(0)
            r = time_loader(make_loader(dataset, align, args.loader_seconds_per_batch, workers))
            rows.append((align, workers, r))
    print(f"\nLoader: {len(dataset)} noise FLACs ({dataset.len_list.sum() / SAMPLE_RATE / 60:.1f} min of audio, "
          f"2 s..15.6 s kept), 10 buckets, {args.loader_seconds_per_batch:g} s per batch, MFCC labels")
    print(f"{'align':<9}{'workers':>8}{'batches':>8}{'first s':>9}{'wall s':>8}{'audio s/s':>11}{'batches/s':>10}")
    for align, workers, r in rows:
        print(f"{align:<9}{workers:>8}{r['batches']:>8}{r['first']:>9.2f}{r['wall']:>8.2f}"
              f"{r['audio'] / r['wall']:>11.0f}{r['batches'] / r['wall']:>10.2f}")
    torch.set_num_threads(args.threads)
    return rows


def padding_section(args) -> list:
    lengths = librispeech_like_lengths(args.utterances)
    kept = (lengths >= 32000) & (lengths <= 250000)
    rows = []
    for name, s in (("Habana", HABANA), ("upstream", UPSTREAM)):
        for align in ("none", "bucket1", "bucket2"):
            sampler = BucketizeBatchSampler(lengths, num_buckets=s["num_buckets"], min_len=32000, max_len=250000,
                                            max_token_count=s["seconds_per_batch"] * SAMPLE_RATE,
                                            shuffle=s["shuffle"], align_buckets=align)
            aligner = sampler.gen_bucket_boundary_fn() if align != "none" else None
            stats = loader_stats(sampler, lengths, pad=align != "none", aligner=aligner)
            rows.append((name, s, align, stats))
    print(f"\nPadding: {args.utterances} LibriSpeech-like utterances ({lengths.sum() / SAMPLE_RATE / 3600:.1f} h); "
          f"{1 - kept.mean():.1%} lie outside [2 s, 15.625 s] and are dropped by the sampler")
    print(f"{'settings':<26}{'align':<9}{'batches':>8}{'mean B':>8}{'shapes':>8}{'lens':>6}{'padding':>9}{'cropped':>9}"
          f"{'fed/audio':>10}")
    for name, s, align, st in rows:
        label = f"{name} {s['num_buckets']} bkt {s['seconds_per_batch']:g} s"
        mean_b = sum(b * c for (b, _), c in st.shapes.items()) / st.num_batches
        fed = st.collated_samples / (st.audio_samples + st.cropped_samples)
        print(f"{label:<26}{align:<9}{st.num_batches:>8}{mean_b:>8.1f}{len(st.shapes):>8}"
              f"{len({t for _, t in st.shapes}):>6}{st.padding_fraction:>9.1%}{st.cropped_fraction:>9.1%}{fed:>10.3f}")
    print("shapes: distinct (batch, samples); lens: distinct sample counts; padding: zeros among the samples "
          "fed; cropped: audio cut away (crop to shortest); fed/audio: samples fed per sample of kept audio")
    return rows


def cpu_timed(fn, *a):
    start = time.process_time()
    out = fn(*a)
    return out, time.process_time() - start


def preprocess_section(args, data) -> dict:
    torch.set_num_threads(1)
    files = sorted((data.parent / "audio" / "train").glob("*.flac"))[:args.mfcc_files]
    extract = mfcc_extractor().extract
    decode_s = mfcc_s = audio_s = 0.0
    for f in files:
        wave, t = cpu_timed(load_audio, f)
        decode_s += t
        _, t = cpu_timed(extract, wave)
        mfcc_s += t
        audio_s += len(wave) / SAMPLE_RATE
    h_per_min = lambda cpu: (audio_s / 3600) / (cpu / 60)  # noqa: E731
    print(f"\nPreprocess, 1 thread, CPU time: MFCC on {len(files)} files ({audio_s / 60:.1f} min of audio)")
    print(f"{'step':<34}{'CPU s':>8}{'audio h / CPU-min':>19}{'x real time':>13}")
    for step, cpu in (("FLAC decode", decode_s), ("MFCC + deltas (39-D)", mfcc_s),
                      ("decode + MFCC", decode_s + mfcc_s)):
        print(f"{step:<34}{cpu:>8.2f}{h_per_min(cpu):>19.2f}{audio_s / cpu:>13.0f}")
    rows = {}
    gen = torch.Generator().manual_seed(0)
    print(f"{'k-means predict (K, D)':<34}{'frames':>8}{'frames/s':>12}{'audio h / CPU-min':>19}")
    for k, d, hz in ((100, 39, 100), (500, 768, 50)):
        feats, centers = torch.randn(args.predict_frames, d, generator=gen), torch.randn(k, d, generator=gen)
        predict(feats[:1000], centers)  # warm up the matmul kernels
        _, cpu = cpu_timed(predict, feats, centers)
        rows[(k, d)] = args.predict_frames / cpu
        print(f"{f'K={k}, D={d} ({hz} Hz features)':<34}{args.predict_frames:>8}{rows[(k, d)]:>12.0f}"
              f"{args.predict_frames / hz / 3600 / (cpu / 60):>19.2f}")
    torch.set_num_threads(args.threads)
    return dict(decode=decode_s, mfcc=mfcc_s, audio=audio_s, predict=rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="loader,padding,preprocess")
    p.add_argument("--files", type=int, default=500, help="generated FLACs for the loader and MFCC sections")
    p.add_argument("--workers", help="DataLoader num_workers values (default 0,1,2)")
    p.add_argument("--aligns", default="none,bucket1", help="align modes of the loader section")
    p.add_argument("--loader-seconds-per-batch", type=float, default=87.5)
    p.add_argument("--utterances", type=int, default=28539, help="lengths for the padding section (train-clean-100)")
    p.add_argument("--mfcc-files", type=int, default=40)
    p.add_argument("--predict-frames", type=int, default=100000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--corpus", type=Path, help="keep the generated corpus here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.files, args.utterances, args.mfcc_files, args.predict_frames = 12, 2000, 3, 2000
        args.loader_seconds_per_batch, args.workers = 30.0, args.workers or "0,1"
    args.workers = [int(w) for w in (args.workers or "0,1,2").split(",")]
    args.aligns = args.aligns.split(",")
    args.sections = args.sections.split(",")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    if "padding" in args.sections:
        results["padding"] = padding_section(args)
    if {"loader", "preprocess"} & set(args.sections):
        with tempfile.TemporaryDirectory() as tmp:
            root = args.corpus or Path(tmp)
            data = root / "data"
            if not (data / "tsv" / "librispeech_train.tsv").is_file():
                start = time.perf_counter()
                write_corpus(root, librispeech_like_lengths(args.files, seed=1))
                print(f"wrote {args.files} FLACs in {time.perf_counter() - start:.1f} s")
            if "loader" in args.sections:
                results["loader"] = loader_section(args, data)
            if "preprocess" in args.sections:
                results["preprocess"] = preprocess_section(args, data)
    return results


if __name__ == "__main__":
    main()
