"""How often torch.compile recompiles our model over an epoch of bucketed batches.

    python bench/recompiles.py                          # micro model, CPU, eager backend: ~20 minutes
    python bench/recompiles.py --device cuda --model base --backend inductor --dtype bf16

Batches come from ``BucketizeBatchSampler`` on a LibriSpeech-like length list (``bench/data_path.py``),
shaped as ``CollateFnHubert`` would shape them (``align none`` crops to the shortest, ``bucket1`` pads to
the bucket boundary), in a shuffled order as ``DistributedBatchSampler`` deals them. Each batch is random
audio and labels of that shape; the compiled model runs forward + loss + backward on it. Recompiles are
counted from Dynamo's ``recompiles`` log (one record per recompilation, with its guard-failure reason),
graphs from a counting backend. Which guards fail does not depend on widths or on the backend, so the
``micro`` model (Base's 7 convs and 12 layers, narrow) and the ``eager`` backend give the same counts as
Base with inductor, in minutes on a CPU. Dynamo's recompile limits are raised so the count is complete; a
function recompiled more than ``DEFAULT_RECOMPILE_LIMIT`` times would fall back to eager by default.
"""
import argparse
import logging
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from bench.data_path import librispeech_like_lengths  # noqa: E402
from bench.model_step import HABANA_FLAGS  # noqa: E402
from dataset import BucketizeBatchSampler, DistributedBatchSampler  # noqa: E402
from loss import hubert_loss, hubert_loss_static  # noqa: E402
from model import FACTORIES, hubert_pretrain_model  # noqa: E402

DEFAULT_RECOMPILE_LIMIT = torch._dynamo.config.recompile_limit  # 8 in torch 2.11
MODEL_FORWARD = "forward model/hubert.py:63"  # HuBERTPretrainModel.forward, as by_function names it
MICRO = dict(extractor_conv_layer_config=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
             encoder_embed_dim=64, encoder_num_heads=1, encoder_ff_interm_features=128, final_dim=32)
CASES = {  # name -> (model flags, align_buckets): default flags or Habana's static ones, and the bucket mode
    "dynamic-none": ({}, "none"),
    "static-none": (HABANA_FLAGS, "none"),
    "static-bucket1": (HABANA_FLAGS, "bucket1"),
}


class CompileCounter:
    """Counts Dynamo's work while active: graphs given to the backend and recompilations (with reasons).

    Recompiles come from the ``recompiles`` log artifact, which Dynamo writes once per recompilation of a
    frame, whatever the backend; the records are caught here instead of printed."""

    def __init__(self, backend="eager"):
        self.inner = torch._dynamo.lookup_backend(backend)
        self.graphs = 0
        self.recompiles = []  # log messages
        self.eager = Counter()  # frames Dynamo would not convert (run eagerly): 'name file:line' -> times
        self._handler = logging.Handler()
        self._handler.emit = lambda record: self.recompiles.append(record.getMessage())
        self._logger = logging.getLogger("torch._dynamo.guards.__recompiles")
        self._frame_handler = logging.Handler()
        self._frame_handler.emit = self._frame_record
        self._frame_logger = logging.getLogger("torch._dynamo.convert_frame")

    def _frame_record(self, record):
        m = re.match(r"WON'T CONVERT (\S+) (\S+) line (\d+)", record.getMessage())
        if m:
            self.eager[f"{m[1]} {Path(m[2]).parent.name}/{Path(m[2]).name}:{m[3]}"] += 1

    def __deepcopy__(self, memo):
        """Shared, not copied: once Lightning is imported, its patched torch.compile deep-copies the kwargs."""
        return self

    def backend(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)

    def __enter__(self):
        torch._logging.set_logs(recompiles=True)
        self._logger.propagate = False  # ours, not the console's
        self._logger.addHandler(self._handler)
        self._old_level, self._old_propagate = self._frame_logger.level, self._frame_logger.propagate
        self._frame_logger.setLevel(logging.DEBUG)  # "WON'T CONVERT" is a debug record
        self._frame_logger.propagate = False
        self._frame_logger.addHandler(self._frame_handler)
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        self._frame_logger.removeHandler(self._frame_handler)
        self._frame_logger.setLevel(self._old_level)
        self._frame_logger.propagate = self._old_propagate
        torch._logging.set_logs()

    def by_function(self) -> Counter:
        """Recompilations per compiled function ('name file:line')."""
        names = (re.match(r"Recompiling function (\S+) in (\S+)", m) for m in self.recompiles)
        return Counter(f"{n[1]} {Path(n[2]).parent.name}/{Path(n[2]).name}" for n in names if n)


def batch_shapes(lengths, align, args):
    """(batch_size, padded length, per-row lengths) of each batch of one epoch, in the order trained."""
    sampler = BucketizeBatchSampler(lengths, num_buckets=args.num_buckets, min_len=args.min_len,
                                    max_len=args.max_len, max_token_count=args.seconds_per_batch * 16000,
                                    shuffle=False, align_buckets=align)  # Habana: shuffle=False
    aligner = sampler.gen_bucket_boundary_fn() if align != "none" else None
    shapes = []
    for batch in DistributedBatchSampler(sampler, num_replicas=1, rank=0, shuffle=True, seed=0):
        n = lengths[batch]
        target = int(n.max() if aligner else n.min())  # pad to the longest, or crop to the shortest
        width = aligner(target) if aligner else target
        shapes.append((len(batch), width, np.minimum(n, target)))
    return shapes[:args.max_steps] if args.max_steps else shapes


def build_model(args, flags):
    if args.model == "micro":
        config = {**FACTORIES["hubert_pretrain_base"]().config, **MICRO, **flags}
        return hubert_pretrain_model(**config)
    return FACTORIES[f"hubert_pretrain_{args.model}"](**flags)


def run_epoch(model, shapes, static, dynamic, args, device):
    """Compile ``model`` afresh and train (without updates) on one batch per shape; Dynamo's counts."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounter(args.backend)
    compiled = torch.compile(model, backend=counter.backend, dynamic=dynamic)
    num_classes = model.logit_generator.label_embeddings.shape[0]
    seen, at_seen, compiling_steps, step_times = set(), 0, 0, []
    start = time.perf_counter()
    with counter:
        for step, (bsz, width, lens) in enumerate(shapes):
            torch.manual_seed(step)
            frames = (width - 400) // 320 + 1
            batch = (torch.randn(bsz, width, device=device),
                     torch.randint(0, num_classes, (bsz, frames), device=device), torch.as_tensor(lens, device=device))
            before, t = len(counter.recompiles) + counter.graphs, time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                out = compiled(*batch)
                loss = hubert_loss_static(*out) if static else hubert_loss(*out)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            compiled_now = len(counter.recompiles) + counter.graphs > before
            compiling_steps += compiled_now
            at_seen += compiled_now and (bsz, width) in seen
            if not compiled_now:
                step_times.append(time.perf_counter() - t)
            seen.add((bsz, width))
            if args.verbose:
                print(f"  step {step}: {bsz} x {width}, {time.perf_counter() - t:.2f} s, compiled: {compiled_now}",
                      flush=True)
    return dict(counter=counter, seen=seen, at_seen=at_seen, compiling_steps=compiling_steps,
                eager_frames=len(counter.eager), wall=time.perf_counter() - start,
                step=float(np.median(step_times)) if step_times else float("nan"),
                breaks=Counter({k.splitlines()[0]: v for k, v in torch._dynamo.utils.counters["graph_break"].items()}))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="micro", choices=["micro", "tiny", "base"])
    p.add_argument("--backend", default="eager", help="eager / aot_eager / inductor (counts are the same)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust when the cores are shared)")
    p.add_argument("--utterances", type=int, default=1000, help="LibriSpeech-like lengths to batch (an epoch)")
    p.add_argument("--seconds-per-batch", type=float, default=350.0, help="token budget (Habana README: 350)")
    p.add_argument("--num-buckets", type=int, default=10)
    p.add_argument("--min-len", type=int, default=32000)
    p.add_argument("--max-len", type=int, default=250000)
    p.add_argument("--max-steps", type=int, help="stop after this many batches")
    p.add_argument("--dynamic", default="False,None", help="torch.compile dynamic= values to run")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    p.add_argument("--verbose", action="store_true", help="print every step")
    p.add_argument("--quick", action="store_true", help="100 utterances, 30 s batches, 6 steps: a smoke run")
    return p.parse_args(argv)


def run_cases(args, device):
    """One compiled epoch per (case, dynamic) pair; a table row and the details of each."""
    lengths = librispeech_like_lengths(args.utterances)
    rows, details = [], []
    for label in [c.strip() for c in args.cases.split(",")]:
        flags, align = CASES[label]
        shapes = batch_shapes(lengths, align, args)
        for dyn in [{"False": False, "None": None, "True": True}[d.strip()] for d in args.dynamic.split(",")]:
            torch.manual_seed(0)
            model = build_model(args, flags).to(device).train()
            r = run_epoch(model, shapes, bool(flags), dyn, args, device)
            per_fn = r["counter"].by_function()
            rows.append((f"{label} dynamic={dyn}", len(shapes), len(r["seen"]), len({w for _, w in r["seen"]}),
                         r["counter"].graphs, len(r["counter"].recompiles), per_fn[MODEL_FORWARD], r["at_seen"],
                         r["compiling_steps"], max(per_fn.values(), default=0), r["eager_frames"], r["step"],
                         r["wall"]))
            details.append((rows[-1][0], per_fn, r["breaks"], r["counter"].eager))
            print(f"done: {rows[-1]}", flush=True)
    return rows, details


def print_report(args, rows, details):
    print(f"\n{args.model} model, {args.backend} backend, {args.device} {args.dtype}; {args.utterances} "
          f"LibriSpeech-like utterances, {args.num_buckets} buckets, {args.seconds_per_batch:g} s per batch")
    head = ("case", "steps", "shapes", "lens", "graphs", "recomp", "fwd", "@seen", "c.steps", "max/fn", "eager",
            "ms/step", "wall s")
    print(f"{head[0]:<30}" + "".join(f"{h:>8}" for h in head[1:]))
    for row in rows:
        print(f"{row[0]:<30}" + "".join(f"{v:>8}" for v in row[1:11]) + f"{row[11] * 1e3:>8.0f}{row[12]:>8.0f}")
    print("shapes: distinct (batch, samples); lens: distinct sample counts; graphs: graphs compiled; recomp: "
          "recompilations of any function; fwd: of the model's forward (shape-driven); @seen: steps that "
          "compiled at a shape already seen; c.steps: steps that compiled anything; max/fn: most recompiles of "
          "one function; eager: frames Dynamo runs eagerly; ms/step: median of steps that did not compile")
    for label, per_fn, breaks, eager in details:
        print(f"\n{label}: recompiles by function: " + ", ".join(f"{k} x{v}" for k, v in per_fn.most_common(6)))
        over = [k for k, v in per_fn.items() if v >= DEFAULT_RECOMPILE_LIMIT]
        print(f"  over the default recompile_limit ({DEFAULT_RECOMPILE_LIMIT}), so eager after "
              f"{DEFAULT_RECOMPILE_LIMIT} variants: " + (", ".join(over) or "none"))
        print("  graph breaks: " + "; ".join(f"{k} x{v}" for k, v in breaks.most_common(4)))
        print("  run eagerly (graph break in a loop): " + ", ".join(eager))


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.utterances, args.seconds_per_batch, args.max_steps = 100, 30.0, args.max_steps or 6
    torch.set_num_threads(args.threads)
    # Raised so that every recompile is counted instead of the frame falling back to eager.
    with torch._dynamo.config.patch(recompile_limit=10 ** 6, accumulated_recompile_limit=10 ** 6):
        rows, details = run_cases(args, torch.device(args.device))
    torch._dynamo.reset()
    print_report(args, rows, details)
    return rows


if __name__ == "__main__":
    main()
