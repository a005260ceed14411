"""The GPU suite: on one NVIDIA GPU, in a few minutes, the figures that size a LibriSpeech-960 run, as one
markdown table. Run it through bench/gpu_suite.sh (which brings the packages the GPU image lacks).

    python bench/gpu_suite.py [--out table.md] [--sections step train preprocess kmeans]
    python bench/gpu_suite.py --cpu-smoke          # every section, reduced, on CPU (the test suite runs this)

Sections (each timed; the table ends with their wall times):
  ceiling     bf16 8192^3 matmul: the card's attainable peak, for reading the MFU figures
  step        full training step (forward, loss, backward, clip, fused AdamW), bf16 autocast, HuBERT Base,
              22 utterances over the top bucket of --align-buckets bucket1 (14.26-15.625 s, padded to
              250001 samples): torchaudio's model and ours (default and Habana flags), eager and
              torch.compile (bench/train_step.py); audio s/s and MFU (bench/flops.py)
  train       train.py --gpus 1, 200 updates of Base on the demo corpus with the real loader (8 workers,
              Habana flags + bucket1, 87.5 s per batch): audio s/s, MFU, time waiting for batches
  preprocess  HuBERT-layer features on the GPU (preprocess.py --feat-type hubert --use-gpu): the extractor
              alone over a corpus (the demo corpus linked 20 times, 1.6 h), and the whole preprocess.py run
  kmeans      k-means fit of 100k x 768 frames, K=500: sklearn (upstream's settings, all cores), faiss on
              CPU, faiss on the GPU when the installed faiss has GPU support
"""
import argparse
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: the repo's packages
from bench import kmeans as kmeans_bench  # noqa: E402
from bench import train_step  # noqa: E402
from bench.flops import flops_per_audio_second  # noqa: E402
from model import FACTORIES  # noqa: E402
from utils.callbacks import TrainStatCallback  # noqa: E402
from utils.curves import metrics_csv, read_metrics  # noqa: E402

SECTIONS = ("ceiling", "step", "train", "preprocess", "kmeans")
PEAK_TFLOPS = train_step.H100_SXM_BF16_TFLOPS  # datasheet dense bf16 of the H100/H200 SXM: MFU's denominator
TOP_BUCKET = ("15.6250625", "14.2625625")  # bucket1, 10 buckets: 250001 samples, the bucket starts at 228201


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gpu_suite"), help="corpora, labels, checkpoints")
    p.add_argument("--out", type=Path, help="also write the table here")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks that every section runs")
    return p.parse_args(argv)


def row(section, what, value, note=""):
    return (section, what, value, note)


def ceiling(args):
    n, reps = (256, 2) if args.cpu_smoke else (8192, 10)
    device = "cpu" if args.cpu_smoke else "cuda"
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    tflops = 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12
    return [row("ceiling", f"bf16 matmul {n}^3", f"{tflops:.0f} TFLOP/s" if tflops >= 1 else f"{tflops:.3f} TFLOP/s",
                f"{tflops / PEAK_TFLOPS:.0%} of the {PEAK_TFLOPS:g} TFLOP/s datasheet peak MFU is quoted against")]


def step(args):
    if args.cpu_smoke:
        argv = ["--quick", "--threads", "1", "--compile-backend", "eager", "--peak-tflops", "1", "--pad-from", "1.5"]
    else:
        argv = ["--model", "base", "--device", "cuda", "--dtype", "bf16", "--batch-size", "22",
                "--seconds", TOP_BUCKET[0], "--pad-from", TOP_BUCKET[1], "--optimizer", "fusedadamw",
                "--rounds", "10", "--warmup", "3"]
    results = train_step.main([*argv, "--compile-reference"])
    shape = "tiny 1 x 2 s, fp32" if args.cpu_smoke else "Base 22 x 14.3-15.6 s padded to 250001, bf16"
    return [row("step", f"{label} ({shape})", f"{r['seconds'] * 1e3:.0f} ms, {r['audio_per_s']:.0f} audio s/s",
                f"MFU {r['mfu']:.1%}, {r['ratio']:.2f} x torchaudio's time") for label, r in results.items()]


def make_labels(args, corpus: Path) -> Path:
    import preprocess

    exp = args.workdir / "labels"
    preprocess.main(["--root-dir", str(corpus), "--exp-dir", str(exp), "--feat-type", "mfcc",
                     "--num-cluster", "20" if args.cpu_smoke else "100", "--num-rank", "1", "--valid-percent", "0.1"])
    return exp / "data" / "mfcc"


def train(args):
    import train as train_script

    corpus = copied_corpus(args.workdir / "train_corpus", copies=1, files=12 if args.cpu_smoke else None)
    data = make_labels(args, corpus)
    exp = args.workdir / "train_exp"
    flags = ["--dataset-path", str(data), "--exp-dir", str(exp), "--feature-type", "mfcc", "--num-classes",
             "20" if args.cpu_smoke else "100", "--all-static", "--align-buckets", "bucket1", "--num-buckets", "10",
             "--use-conv2d", "--use-instancenorm", "--optimizer", "fusedadamw", "--use-fused-clip",
             "--log-every-n-steps", "1"]
    if args.cpu_smoke:
        flags += ["--model-name", "hubert_pretrain_tiny", "--accelerator", "cpu", "--max-updates", "3",
                  "--warmup-updates", "1", "--seconds-per-batch", "16", "--num-workers", "1"]
    else:
        flags += ["--gpus", "1", "--max-updates", "200", "--warmup-updates", "20", "--seconds-per-batch", "87.5",
                  "--num-workers", "8", "--val-check-interval", "100"]
    trainer, module = train_script.main(flags)
    stats = next(c for c in trainer.callbacks if isinstance(c, TrainStatCallback))
    series = read_metrics(metrics_csv(exp))
    rates = [v for step, v in series.get("audio_seconds_per_second", []) if step >= min(10, trainer.global_step - 1)]
    waits = [v for _, v in series.get("data_wait", [])]
    audio_per_s = statistics.median(rates) if rates else float("nan")
    mean_len = int(np.mean(module._datasets["train"].len_list))
    mfu = flops_per_audio_second(module.model.config, mean_len) * audio_per_s / (PEAK_TFLOPS * 1e12)
    what = (f"train.py, {trainer.global_step} updates of {module.hparams.model_name}, demo corpus, "
            f"{module.hparams.seconds_per_batch:g} s/batch, {module.hparams.num_workers} workers")
    return [row("train", what, f"{audio_per_s:.0f} audio s/s", f"MFU {mfu:.1%} (median over updates)"),
            row("train", "waiting for batches", f"{stats.data_wait:.1f} s in {len(waits)} updates",
                f"median {statistics.median(waits) * 1e3:.0f} ms, max {max(waits) * 1e3:.0f} ms per update; "
                f"{stats.first_batch_wait:.1f} s of it before the first update of an epoch" if waits else "")]


def copied_corpus(root: Path, copies: int, files=None) -> Path:
    """The demo corpus's training FLACs, copied ``copies`` times under new names (``files`` of them each): copies,
    as preprocess.py lists a file reached through several links once."""
    source = sorted((REPO / "demo_data" / "LibriSpeech" / "train-clean-100").rglob("*.flac"))[:files]
    for k in range(copies):
        for flac in source:
            copy = root / "train-clean-100" / f"copy{k}" / flac.relative_to(flac.parents[2])
            if not copy.exists():
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(flac, copy)
    return root


def random_checkpoint(args) -> Path:
    """A freshly initialised model saved as train.py saves one (features' speed does not depend on training)."""
    name = "hubert_pretrain_tiny" if args.cpu_smoke else "hubert_pretrain_base"
    model = FACTORIES[name](num_classes=100)
    path = args.workdir / f"{name}.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hubert_config": model.config}, path)
    return path


def preprocess(args):
    from utils.feature_utils import hubert_extractor, load_audio

    corpus = copied_corpus(args.workdir / "pre_corpus", copies=1 if args.cpu_smoke else 20,
                           files=4 if args.cpu_smoke else None)
    checkpoint, device = random_checkpoint(args), "cpu" if args.cpu_smoke else "cuda"
    layer = 2 if args.cpu_smoke else 6
    extractor = hubert_extractor(checkpoint, layer, torch.device(device))
    flacs = sorted(corpus.rglob("*.flac"))
    extractor.extract(load_audio(flacs[0]))  # warm-up
    sync(device)
    start, audio = time.perf_counter(), 0
    for flac in flacs:
        waveform = load_audio(flac)
        extractor.extract(waveform)
        audio += len(waveform) / 16000
    sync(device)
    extract_s = time.perf_counter() - start
    rows = [row("preprocess", f"HuBERT layer {layer} features, one utterance at a time ({len(flacs)} files)",
                f"{audio / 3600 / (extract_s / 60):.2f} audio h/min", f"{audio / 3600:.2f} h in {extract_s:.1f} s, "
                "FLAC decoding included")]
    backend = "faiss" if faiss_module() is not None else "sklearn"
    cmd = [sys.executable, str(REPO / "preprocess.py"), "--root-dir", str(corpus), "--exp-dir",
           str(args.workdir / "pre_exp"), "--feat-type", "hubert", "--layer-index", str(layer), "--checkpoint-path",
           str(checkpoint), "--num-cluster", "20" if args.cpu_smoke else "100", "--percent", "0.1" if not args.cpu_smoke
           else "-1", "--num-rank", "1", "--kmeans-backend", backend, "--valid-percent", "0.1",
           *(["--device", "cpu"] if args.cpu_smoke else ["--use-gpu"])]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    whole_s = time.perf_counter() - start
    rows.append(row("preprocess", f"whole preprocess.py --feat-type hubert run, k-means by {backend}",
                    f"{audio / 3600 / (whole_s / 60):.2f} audio h/min", f"{whole_s:.1f} s: start-up, file checks, "
                    "features, k-means on 10 %, labels"))
    return rows


def faiss_module():
    try:
        return kmeans_bench.import_faiss()
    except ImportError:
        return None


def kmeans(args):
    n, dim, k = (3000, 16, 8) if args.cpu_smoke else (100_000, 768, 500)
    feats, means = kmeans_bench.mixture(n, dim, k, seed=0)
    reference = kmeans_bench.inertia(feats, means)
    faiss = faiss_module()
    fits = [("sklearn (upstream's MiniBatchKMeans)", "sklearn", False)]
    if faiss is not None:
        fits.append(("faiss CPU", "faiss", False))
        if faiss.get_num_gpus() > 0:
            fits.append(("faiss GPU", "faiss", True))
    rows = []
    for label, backend, gpu in fits:
        start = time.perf_counter()
        centers = kmeans_bench.fit_kmeans(feats, k, 0, backend, gpu).cluster_centers_
        seconds = time.perf_counter() - start
        excess = kmeans_bench.inertia(feats, centers) / reference - 1
        rows.append(row("kmeans", f"{label}, {n} x {dim}, K={k}", f"{seconds:.1f} s",
                        f"inertia {excess:+.2%} vs the generating centres"))
    if len(fits) < 3:
        why = "faiss is not installed" if faiss is None else "the installed faiss has no GPU support"
        rows.append(row("kmeans", "faiss GPU", "not measured", why))
    return rows


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA GPU here; --cpu-smoke runs the reduced form on CPU")
    args.workdir.mkdir(parents=True, exist_ok=True)
    device = "CPU (smoke run)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    rows, times = [], []
    for section in args.sections:
        start = time.perf_counter()
        rows += globals()[section](args)
        times.append(f"{section} {math.ceil(time.perf_counter() - start)} s")
    lines = [f"GPU suite on {device}, torch {torch.__version__}; section wall times: {', '.join(times)}", "",
             "| section | measurement | value | notes |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
