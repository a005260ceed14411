"""Full optimizer step throughput and MFU: our HuBERT vs torchaudio's, same weights, same batch.

    python bench/train_step.py                      # Base, 4 x 4 s, CPU fp32, 2 threads: ratios only
    python bench/train_step.py --model tiny --threads 1     # 1 thread when other jobs share the cores
    python bench/train_step.py --device cuda --dtype bf16 --batch-size 16 --seconds 10   # MFU vs 989 TF

One step = forward + loss + backward + clip_grad_norm_(10) + AdamW step, identical for every variant
(the optimizer and clip are ``utils.device``'s, as training uses them). Variants run in interleaved rounds
(one step each per round, same seed per round, so the same masks and layer drops) and the table shows the
median. MFU = training FLOPs per audio second (``bench/flops.py``, from the architecture) x audio seconds
per second / peak FLOP/s; printed only when a peak is known (``--peak-tflops``; defaults to 989, H100 SXM
dense bf16, on CUDA). The compiled row times steady state: its first (compiling) steps are warmup. With
``--pad-from`` the batch is padded as ``--align-buckets bucket1`` pads it, and audio seconds count the
unpadded audio (padding is work, not data).
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from bench.flops import flops_per_audio_second  # noqa: E402
from bench.model_step import HABANA_FLAGS, add_step_args, make_batch, reference_model  # noqa: E402
from bench.recompiles import CompileCounter  # noqa: E402
from loss import hubert_loss, hubert_loss_static  # noqa: E402
from model import FACTORIES, convert_conv_layout  # noqa: E402
from utils.device import clip_grad_norm, make_optimizer  # noqa: E402

H100_SXM_BF16_TFLOPS = 989.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "fusedadamw"],
                   help="fusedadamw = AdamW(fused=True) off HPU, with the foreach clip")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--compile-reference", action="store_true", help="add a torch.compile row of torchaudio's model")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--peak-tflops", type=float,
                   help=f"device peak for MFU (default {H100_SXM_BF16_TFLOPS:g} on cuda, none on cpu)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (the compiled row compiles here)")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 x 2 s, 2 rounds: a smoke run")
    return p.parse_args(argv)


def build_variants(args, ref, num_classes, counter):
    """label -> (module to call, parameters, static loss?); ours load torchaudio's weights."""
    factory = FACTORIES[f"hubert_pretrain_{args.model}"]
    variants = {"torchaudio": (ref, ref, False)}
    if args.compile_reference:
        twin = copy.deepcopy(ref)  # its own weights: every variant steps its own optimizer
        variants["torchaudio + compile"] = (torch.compile(twin, backend=counter.backend), twin, False)
    for label, flags in (("ours default", {}), ("ours habana flags", HABANA_FLAGS)):
        model = factory(num_classes=num_classes, **flags)
        model.load_state_dict(convert_conv_layout(ref.state_dict(), flags.get("use_conv2d", False)))
        variants[label] = (model, model, bool(flags))
    if not args.no_compile:
        model = factory(num_classes=num_classes, **HABANA_FLAGS)
        model.load_state_dict(convert_conv_layout(ref.state_dict(), True))
        variants["ours habana + compile"] = (torch.compile(model, backend=counter.backend), model, True)
    return variants


def make_step(call, model, static, args, device):
    """One optimizer step; the optimizer and clip settings are train.py's defaults."""
    opt = make_optimizer(args.optimizer, model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                         weight_decay=0.01, device_type=device.type)
    fused = args.optimizer == "fusedadamw"

    def step(batch):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = call(*batch)
            loss = hubert_loss_static(*out) if static else hubert_loss(*out)
        loss.backward()
        clip_grad_norm(model.parameters(), 10.0, fused, device.type)
        opt.step()
    return step


def timed(step, batch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.seconds, args.rounds, args.warmup = "tiny", 1, 2.0, 2, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = args.peak_tflops or (H100_SXM_BF16_TFLOPS if device.type == "cuda" else None)
    torch.manual_seed(0)
    ref = reference_model(args.model)
    num_classes = ref.logit_generator.label_embeddings.shape[0]
    batch = make_batch(num_classes, args.batch_size, args.seconds, device, args.pad_from)
    counter = CompileCounter(args.compile_backend)
    steps = {}
    for label, (call, model, static) in build_variants(args, ref, num_classes, counter).items():
        model.to(device).train()
        steps[label] = make_step(call, model, static, args, device)

    times = {label: [] for label in steps}
    with counter:
        for r in range(args.warmup + args.rounds):
            if r == args.warmup:
                warm = (counter.graphs, len(counter.recompiles))
            for label, step in steps.items():
                torch.manual_seed(r)  # same masks and layer drops for every variant
                t = timed(step, batch, device)
                if r >= args.warmup:
                    times[label].append(t)

    config = FACTORIES[f"hubert_pretrain_{args.model}"](num_classes=num_classes).config
    flops = flops_per_audio_second(config, batch[0].shape[1])
    audio = float(batch[2].sum()) / 16000  # unpadded
    base = statistics.median(times["torchaudio"])
    print(f"\nHuBERT {args.model}, batch {args.batch_size} x {args.seconds:g} s, {args.device}, {args.dtype}, "
          f"{args.optimizer}, {args.threads} threads, median of {args.rounds} rounds; "
          f"{flops / 1e9:.2f} GFLOP per audio second (training)")
    print(f"{'variant':<24}{'ms/step':>10}{'audio s/s':>11}{'TFLOP/s':>9}{'MFU':>8}{'ratio':>8}")
    results = {}
    for label, ts in times.items():
        t = statistics.median(ts)
        achieved = flops * audio / t
        mfu = f"{achieved / (peak * 1e12):.1%}" if peak else "-"
        print(f"{label:<24}{t * 1e3:>10.1f}{audio / t:>11.1f}{achieved / 1e12:>9.3f}{mfu:>8}{t / base:>8.2f}")
        results[label] = dict(seconds=t, audio_per_s=audio / t, tflops=achieved / 1e12,
                              mfu=achieved / (peak * 1e12) if peak else None, ratio=t / base)
    if not args.no_compile:
        print(f"compile ({args.compile_backend}): {warm[0]} graphs and {warm[1]} recompiles in warmup, "
              f"{counter.graphs - warm[0]} graphs and {len(counter.recompiles) - warm[1]} recompiles in timed rounds; "
              f"run eagerly: {', '.join(counter.eager) or 'nothing'}")
    return results


if __name__ == "__main__":
    main()
