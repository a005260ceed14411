"""Where the tiny CPU recipe's time goes: one training step of hubert_pretrain_tiny as it was (128-channel CNN,
attention dropout 0.1) and with each speed-up of today's recipe, interleaved, same weights where shapes allow.

    python bench/tiny_speed.py                        # 1 x 13 s (a real-speech batch), 2 threads, 6 rounds
    python bench/tiny_speed.py --threads 1 --rounds 10

One step = forward + loss + backward + clip + AdamW (bench/train_step.py's step). Attention dropout draws a
mask over every (head, frame, frame) score, which also takes SDPA off its fused CPU kernel; bf16 autocast pays
off only where the CPU multiplies bf16 in hardware (utils.device.fast_cpu_bf16).
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from bench.model_step import make_batch  # noqa: E402
from bench.train_step import make_step, timed  # noqa: E402
from model import hubert_pretrain_tiny  # noqa: E402
from utils.device import fast_cpu_bf16  # noqa: E402

CNN128 = [(128, 10, 5)] + [(128, 3, 2)] * 4 + [(128, 2, 2)] * 2
VARIANTS = {  # label -> (model arguments, bf16 autocast)
    "before: CNN 128, attention dropout 0.1": (dict(extractor_conv_layer_config=CNN128, encoder_attention_dropout=0.1),
                                               False),
    "attention dropout 0": (dict(extractor_conv_layer_config=CNN128), False),
    "CNN 64": (dict(encoder_attention_dropout=0.1), False),
    "both (today's model, fp32)": ({}, False),
    "both + bf16 autocast": ({}, True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seconds", type=float, default=13.0, help="audio seconds per utterance")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    batch = make_batch(100, args.batch_size, args.seconds, cpu)
    steps = {}
    for label, (model_args, bf16) in VARIANTS.items():
        torch.manual_seed(0)
        model = hubert_pretrain_tiny(num_classes=100, **model_args).train()
        step_args = argparse.Namespace(optimizer="adamw", dtype="bf16" if bf16 else "fp32")
        steps[label] = make_step(model, model, False, step_args, cpu)
    times = {label: [] for label in steps}
    for r in range(args.warmup + args.rounds):
        for label, step in steps.items():
            torch.manual_seed(r)
            t = timed(step, batch, cpu)
            if r >= args.warmup:
                times[label].append(t)
    medians = {label: statistics.median(ts) for label, ts in times.items()}
    before = next(iter(medians.values()))
    print(f"\nhubert_pretrain_tiny training step, {args.batch_size} x {args.seconds:g} s, {args.threads} threads, "
          f"median of {args.rounds} rounds; bf16 in hardware: {fast_cpu_bf16()}")
    print("| variant | ms / step | time vs before |\n|---|---|---|")
    for label, t in medians.items():
        print(f"| {label} | {t * 1e3:.0f} | {t / before:.2f}x |")
    return medians


if __name__ == "__main__":
    main()
