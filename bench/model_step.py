"""Forward + backward time per training step: our HuBERT vs torchaudio's, same weights, same batch.

    python bench/model_step.py                      # Base, 4 x 4 s, CPU, 2 threads
    python bench/model_step.py --device cuda --dtype bf16 --compile

Variants are timed in interleaved rounds (one step of each per round) so that machine noise hits all of
them alike; the table shows the median step time and the ratio to torchaudio's (lower is faster).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchaudio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from loss import hubert_loss, hubert_loss_static
from model import FACTORIES, convert_conv_layout

HABANA_FLAGS = dict(use_conv2d=True, use_instancenorm=True, static_indexing=True, static_layerdrop=True,
                    static_logit_generator=True, split_logits=True, use_max_sub_softmax_opt=True)


def add_step_args(p: argparse.ArgumentParser):
    """The model, batch and device arguments shared with bench/train_step.py."""
    p.add_argument("--model", default="base", choices=["base", "tiny"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4.0, help="audio seconds per utterance")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    p.add_argument("--pad-from", type=float, default=None, metavar="SECONDS",
                   help="utterance lengths spread over [SECONDS, --seconds), zero-padded to --seconds (e.g. 14.26 "
                        "with --seconds 15.6250625: the top bucket of --align-buckets bucket1 with 10 buckets)")


def make_batch(num_classes, batch_size, seconds, device, pad_from=None):
    """Random audio of equal lengths (no padding, so every variant does the same useful work), or with
    ``pad_from`` lengths spread evenly over [pad_from, seconds) s and zero padding up to ``seconds``."""
    n = int(seconds * 16000)
    frames = (n - 400) // 320 + 1
    lengths = torch.full((batch_size,), n)
    if pad_from is not None:
        lengths = torch.linspace(pad_from * 16000, n - 1, batch_size).long()
    waveforms = torch.randn(batch_size, n) * (torch.arange(n) < lengths[:, None])
    batch = (waveforms, torch.randint(0, num_classes, (batch_size, frames)), lengths)
    return tuple(t.to(device) for t in batch)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p)
    p.add_argument("--compile", action="store_true", help="add torch.compile rows of our model")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: a smoke run")
    return p.parse_args(argv)


def reference_model(name):
    if name == "base":
        return torchaudio.models.hubert_pretrain_base()
    # torchaudio has no tiny factory: build ours' config through torchaudio's builder.
    config = FACTORIES["hubert_pretrain_tiny"]().config
    upstream = {k: v for k, v in config.items() if k in torchaudio.models.hubert_pretrain_model.__code__.co_varnames}
    return torchaudio.models.hubert_pretrain_model(**upstream)


def make_step(model, batch, static, device, dtype):
    """One training step's forward + loss + backward (no optimizer update)."""
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(*batch)
            loss = hubert_loss_static(*out) if static else hubert_loss(*out)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.model, args.rounds, args.warmup = "tiny", 2, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ref = reference_model(args.model)
    factory = FACTORIES[f"hubert_pretrain_{args.model}"]
    num_classes = ref.logit_generator.label_embeddings.shape[0]
    batch = make_batch(num_classes, args.batch_size, args.seconds, device, args.pad_from)

    variants = {"torchaudio": (ref, False)}
    for label, flags in (("ours default", {}), ("ours habana flags", HABANA_FLAGS)):
        model = factory(num_classes=num_classes, **flags)
        model.load_state_dict(convert_conv_layout(ref.state_dict(), flags.get("use_conv2d", False)))
        variants[label] = (model, bool(flags))
        if args.compile:
            variants[label + " + compile"] = (torch.compile(model), bool(flags))
    steps = {}
    for label, (model, static) in variants.items():
        model.to(device).train()
        steps[label] = make_step(model, batch, static, device, args.dtype)

    times = {label: [] for label in steps}
    for r in range(args.warmup + args.rounds):
        for label, step in steps.items():
            torch.manual_seed(r)  # same masks and layer drops for every variant
            start = time.perf_counter()
            step()
            if r >= args.warmup:
                times[label].append(time.perf_counter() - start)

    base = statistics.median(times["torchaudio"])
    audio = float(batch[2].sum()) / 16000
    print(f"\nHuBERT {args.model}, batch {args.batch_size} x {args.seconds:g} s, {args.device}, {args.dtype}, "
          f"{args.threads} threads, median of {args.rounds} rounds")
    print(f"{'variant':<28}{'ms/step':>10}{'audio s/s':>11}{'ratio':>8}")
    for label, ts in times.items():
        t = statistics.median(ts)
        print(f"{label:<28}{t * 1e3:>10.1f}{audio / t:>11.1f}{t / base:>8.2f}")


if __name__ == "__main__":
    main()
