"""FLOPs of a HuBERT training step, counted from the architecture, for MFU (field-notes §3).

    python bench/flops.py                       # Base at T=500 (10 s): the field-notes check, ~44.6 GFLOP
    python bench/flops.py --model tiny --seconds 4

Only GEMM and conv multiply-accumulates are counted (norms, GELU, softmax are memory-bound and left out,
as the MFU convention does); 1 MAC = 2 FLOPs and training = 3 x forward (backward ~ 2 x forward). Frame
counts are exact for the given utterance length, so a per-audio-second figure depends (a little, through
attention) on the crop length: that is why the helpers take ``num_samples``.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from model import FACTORIES  # noqa: E402
from model.hubert import HUBERT_CONV  # noqa: E402

SAMPLE_RATE = 16000
PARTS = ("cnn", "projection", "pos_conv", "linear", "attention", "logits")


def arch_config(name: str, **overrides) -> dict:
    """``model.config`` of a factory (what a checkpoint stores), with ``overrides`` on top."""
    return {**FACTORIES[f"hubert_pretrain_{name}"]().config, **overrides}


def conv_lengths(num_samples: int, conv_config) -> list:
    """Output frames of each conv layer for one utterance (no padding, as the extractor)."""
    lengths, n = [], num_samples
    for _, kernel, stride in conv_config:
        n = (n - kernel) // stride + 1
        lengths.append(n)
    return lengths


def forward_macs(config: dict, num_samples: int) -> dict:
    """MACs of one forward pass over one utterance of ``num_samples`` samples, by part (``PARTS``)."""
    conv = config.get("extractor_conv_layer_config") or HUBERT_CONV
    frames = conv_lengths(num_samples, conv)
    cnn, c_in = 0, 1
    for (c_out, kernel, _), t in zip(conv, frames):
        cnn += t * c_out * c_in * kernel
        c_in = c_out
    t, d, ff = frames[-1], config["encoder_embed_dim"], config["encoder_ff_interm_features"]
    layers, final_dim = config["encoder_num_layers"], config["final_dim"]
    return {
        "cnn": cnn,
        "projection": t * c_in * d,
        # grouped conv: every output frame sees kernel x (d / groups) inputs per output channel
        "pos_conv": t * d * (d // config["encoder_pos_conv_groups"]) * config["encoder_pos_conv_kernel"],
        "linear": layers * t * (4 * d * d + 2 * d * ff),  # q, k, v, out + the two FFN matmuls
        "attention": layers * 2 * t * t * d,  # scores q k^T and the weighted sum, all heads
        "logits": t * d * final_dim + t * final_dim * config["num_classes"],  # final proj + cosine matmul
    }


def flops_per_audio_second(config: dict, num_samples: int, training: bool = True) -> float:
    """FLOPs per second of (collated) audio for batches of ``num_samples``-sample utterances."""
    macs = sum(forward_macs(config, num_samples).values())
    return 2 * macs * (3 if training else 1) / (num_samples / SAMPLE_RATE)


def samples_for_frames(frames: int) -> int:
    """Shortest utterance that gives ``frames`` 50 Hz frames (T = floor((N - 400) / 320) + 1)."""
    return (frames - 1) * 320 + 400


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", choices=["base", "large", "xlarge", "tiny"])
    p.add_argument("--seconds", type=float, help="utterance length (default: T=500 frames, 10.0 s)")
    p.add_argument("--num-classes", type=int, help="label classes (default: the factory's; Base's is 100)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = arch_config(args.model)
    if args.num_classes:
        config["num_classes"] = args.num_classes
    n = int(args.seconds * SAMPLE_RATE) if args.seconds else samples_for_frames(500)
    macs = forward_macs(config, n)
    sec = n / SAMPLE_RATE
    total = sum(macs.values())
    frames = conv_lengths(n, config["extractor_conv_layer_config"] or HUBERT_CONV)[-1]
    print(f"\nHuBERT {args.model}, {n} samples ({sec:g} s, T={frames}), {config['num_classes']} classes")
    print(f"{'part':<12}{'GMAC/s-audio':>14}{'share':>8}")
    for part in PARTS:
        print(f"{part:<12}{macs[part] / sec / 1e9:>14.3f}{macs[part] / total:>8.1%}")
    print(f"{'forward':<12}{total / sec / 1e9:>14.3f}   = {2 * total / sec / 1e9:.2f} GFLOP/s-audio")
    print(f"training (3 x forward): {flops_per_audio_second(config, n) / 1e9:.2f} GFLOP per second of audio")


if __name__ == "__main__":
    main()
