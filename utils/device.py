"""The one place that knows about devices. Habana and CUDA specifics are imported lazily, so CPU always
works and nothing device-specific is needed to import the project."""
import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass
from typing import Iterable

import torch

from utils.habana_env import AUTOCAST_VARS, op_lists_in_effect, set_op_lists


def mark_step(x: torch.Tensor) -> None:
    """End the current lazy graph on HPU (``htcore.mark_step``); nothing on other devices."""
    if x.device.type == "hpu":
        import habana_frameworks.torch.core as htcore

        htcore.mark_step()


def hpu_graph_breaks(before: Iterable[torch.nn.Module] = (), after: Iterable[torch.nn.Module] = ()) -> None:
    """Forward hooks that end the lazy HPU graph (``mark_step``) just before each module of ``before`` and
    just after each of ``after`` runs in training mode; nothing in eval mode or on other devices. The model
    stays device-free (and scriptable): the training code hands the graph breaks in."""
    for module in before:
        module.register_forward_pre_hook(lambda m, args: mark_step(args[0]) if m.training else None)
    for module in after:
        module.register_forward_hook(lambda m, args, out: mark_step(out) if m.training else None)


# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def tune_cpu_allocator() -> bool:
    """Keep freed activation buffers in the process: glibc unmaps blocks above its mmap threshold on free and
    trims the heap's top, so a CPU training step faults its tens of MB of activations back in every time (a
    tiny-model step: ~4x the page faults, ~15 % of its time; BENCHMARKS.md). Blocks up to 32 MB stay in the
    heap, which keeps up to 1 GB free. Nothing outside glibc (returns False)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in
                   ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)))
    except (OSError, AttributeError):
        return False


def hpu_count() -> int:
    try:
        import habana_frameworks.torch.hpu as hthpu
    except ImportError:
        return 0
    return hthpu.device_count() if hthpu.is_available() else 0


def describe_machine() -> str:
    """What this machine has, for error messages: 'CPU (16 cores), 8 CUDA GPUs (NVIDIA H100)'."""
    parts = [f"CPU ({os.cpu_count()} cores)"]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.device_count()} CUDA GPUs ({torch.cuda.get_device_name(0)})")
    hpus = hpu_count()
    if hpus:
        parts.append(f"{hpus} Habana HPUs")
    return ", ".join(parts)


def check_devices(accelerator: str, devices: int) -> None:
    """Fail early, saying what is there and which flag to use, when the asked device is missing."""
    have = {"cpu": os.cpu_count() or 1, "gpu": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "hpu": hpu_count()}
    if accelerator in ("gpu", "hpu") and have[accelerator] < devices:
        hint = ("--gpus N" if have["gpu"] else "--hpus N" if have["hpu"] else "--accelerator cpu --devices N")
        raise SystemExit(
            f"asked for {devices} {accelerator.upper()}(s), but this machine has {describe_machine()}; "
            f"use {hint} instead{cuda_hint() if accelerator == 'gpu' and not have['gpu'] else ''}"
        )


def cuda_hint() -> str:
    """Why torch may see no GPU on a machine that has some: a CPU-only build, or a driver older than the build."""
    if torch.version.cuda is None:
        return " (this torch is a CPU-only build)"
    return (f" (this torch is built for CUDA {torch.version.cuda}: if the machine has NVIDIA GPUs, check that "
            f"nvidia-smi works and that its driver supports CUDA {torch.version.cuda})")


PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Precision:
    """How training computes: ``autocast`` = bf16 autocast around forward and loss (weights, gradients and
    optimizer stay fp32; no loss scaling is needed with bf16); ``tf32`` = TF32 tensor-core matmuls and convs
    for what stays fp32 (CUDA)."""

    autocast: bool
    tf32: bool = False

    def describe(self, accelerator: str) -> str:
        if not self.autocast:
            return "fp32 (no autocast, no TF32)" if accelerator == "gpu" else "fp32 (no autocast)"
        if accelerator == "hpu":
            return "bf16 autocast with the op lists of --autocast-bf16 / --autocast-fp32"
        return "bf16 autocast" + (", TF32 matmuls for the fp32 rest" if self.tf32 else "")


def _amx() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _avx512_kernels() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _cpu_bf16_attention_breaks() -> bool:
    """torch's bf16 attention packs its operands for AMX whenever the CPU has AMX, with kernels that exist only
    at ATEN_CPU_CAPABILITY avx512: with the capability lowered (``default``, ``avx2``) every bf16 SDPA call
    raises "pack_vnni2 is only supported when avx512 is supported" (torch 2.11)."""
    return _amx() and not _avx512_kernels()


def fast_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX) and torch uses it (its AVX-512
    kernels): there bf16 autocast makes a tiny-model training step ~1.3x faster (bench/tiny_speed.py); without
    it bf16 is emulated, so the tiny recipe keeps fp32."""
    return _amx() and _avx512_kernels()


def gpu_has_bf16() -> bool:
    """bf16 in hardware (Ampere and newer); on Turing (T4) torch emulates it, slower than fp32. Without a visible
    GPU the answer is yes: the run stops at the device check anyway."""
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(choice: str, accelerator: str, autocast: bool) -> Precision:
    """``--precision`` with the seed's ``--autocast``: ``auto`` is bf16 autocast + TF32 on NVIDIA GPUs with bf16
    in hardware (the recipe's GPU runs always used autocast; fp16 + GradScaler upstream, bf16 here; fp32 on
    Turing), and upstream's behaviour elsewhere: bf16 autocast on HPU and CPU only with ``--autocast``."""
    if choice not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {choice!r}")
    if choice == "fp32" and autocast:
        raise ValueError("--autocast asks for bf16 autocast, --precision fp32 for none: give one of them")
    if choice == "auto":
        choice = "bf16" if accelerator == "gpu" and gpu_has_bf16() or autocast else "fp32"
    bf16 = choice == "bf16"
    return Precision(autocast=bf16, tf32=bf16 and accelerator == "gpu")


def configure_process(precision: Precision, accelerator: str) -> None:
    """This training process's switches: on NVIDIA GPUs the TF32 switches (matmuls and cuDNN convs) for
    ``precision``; on CPU the allocator keeps activation buffers (``tune_cpu_allocator``), and bf16 attention
    takes torch's math kernel where its flash kernel cannot run (``_cpu_bf16_attention_breaks``; the switch is
    named for CUDA, torch's CPU dispatch reads it too)."""
    if accelerator == "gpu":
        torch.set_float32_matmul_precision("high" if precision.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = precision.tf32
    elif accelerator == "cpu":
        tune_cpu_allocator()
        if precision.autocast and _cpu_bf16_attention_breaks():
            torch.backends.cuda.enable_flash_sdp(False)


def make_deterministic() -> None:
    """--deterministic: deterministic kernels only (an op without one is an error that names it), cuBLAS's fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG``, unless set already) and no cuDNN autotuning, so that on NVIDIA GPUs a
    resumed run ends at an uninterrupted run's weights bit for bit, as it does on CPU without the flag (CUDA's
    atomics-based kernels, e.g. index_put and scatter backward, add in a varying order). Before any CUDA work.
    Costs GPU speed: the deterministic kernels, a smaller cuBLAS workspace."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def set_hpu_autocast_lists(bf16_file: str, fp32_file: str) -> None:
    """Point Habana autocast at our op lists. utils.habana_env has set them from the command line before torch
    loaded; if Habana's bridge has loaded (it reads them once) while they name other files, stop: autocast would
    silently use those."""
    bridge_loaded = any(m.startswith("habana_frameworks.torch") for m in sys.modules)
    if bridge_loaded and not op_lists_in_effect(bf16_file, fp32_file):
        exports = " ".join(f"{v}={f}" for pair in AUTOCAST_VARS for v, f in zip(pair, (bf16_file, fp32_file)))
        raise SystemExit(f"Habana's PyTorch bridge was loaded before its autocast op lists were set, so they would "
                         f"be ignored: export {exports} before starting")
    set_op_lists(bf16_file, fp32_file)


@contextlib.contextmanager
def hide_our_lightning_module():
    """While active, ``import lightning`` fails.

    lightning-habana builds on the ``lightning`` package whenever a module named ``lightning`` imports, and
    the recipe's own ``lightning.py`` (upstream's file name) does; Habana renamed theirs for this reason.
    Hidden, lightning-habana falls back to ``pytorch_lightning``, which is what we use."""
    ours = sys.modules.get("lightning")
    sys.modules["lightning"] = None
    try:
        yield
    finally:
        if ours is None:
            del sys.modules["lightning"]
        else:
            sys.modules["lightning"] = ours


def import_lightning_habana():
    """lightning-habana's (HPUAccelerator, its DDP strategy, SingleHPUStrategy), or an error saying how to
    install a version that matches this pytorch-lightning.

    The DDP strategy is HPUDDPStrategy (lightning-habana >= 1.5). Habana's recipe used HPUParallelStrategy,
    which was DDP until 1.5 deprecated it and 1.7 made it a plain ParallelStrategy: no DDP wrapper, so no
    gradient all-reduce, and 8 cards would train 8 separate models without a word. It is used only where it
    is still DDP."""
    from pytorch_lightning.strategies import DDPStrategy

    try:
        with hide_our_lightning_module():
            from lightning_habana.pytorch import strategies
            from lightning_habana.pytorch.accelerator import HPUAccelerator
    except ImportError as e:
        import pytorch_lightning

        raise SystemExit(
            f"--hpus needs lightning-habana built for pytorch-lightning {pytorch_lightning.__version__} ({e}); "
            "on Gaudi use the torch, pytorch-lightning and lightning-habana versions of Habana's image "
            "(README: Habana Gaudi)") from e
    ddp = getattr(strategies, "HPUDDPStrategy", None) or strategies.HPUParallelStrategy
    if not issubclass(ddp, DDPStrategy):
        raise SystemExit(f"--hpus: this lightning-habana has no DDP strategy ({ddp.__name__} does not all-reduce "
                         "gradients); use a lightning-habana with HPUDDPStrategy (1.5 or later)")
    return HPUAccelerator, ddp, strategies.SingleHPUStrategy


def hpu_accelerator_and_strategy(devices: int, num_nodes: int, single: bool, find_unused_parameters: bool):
    """lightning-habana's HPUAccelerator and strategy: DDP with Habana's recipe's arguments, or one card."""
    HPUAccelerator, HPUDDPStrategy, SingleHPUStrategy = import_lightning_habana()

    if single and devices == 1 and num_nodes == 1:
        return HPUAccelerator(), SingleHPUStrategy()
    return HPUAccelerator(), HPUDDPStrategy(broadcast_buffers=False, gradient_as_bucket_view=True,
                                            find_unused_parameters=find_unused_parameters)


def exact_fp32() -> None:
    """fp32 matmuls and convolutions in IEEE fp32 on CUDA (torch's default runs cuDNN convolutions in TF32 on
    Ampere and newer): features and labels made on a GPU then match the CPU's to fp32 rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the switches configure_process uses (mixing APIs raises)
    torch.backends.cudnn.allow_tf32 = False


def reduce_dtype(device: torch.device) -> torch.dtype:
    """dtype of counts all-reduced across ranks: float64, but float32 on HPU (float64 there is not verified;
    exact to 2^24, beyond any validation set's character count)."""
    return torch.float32 if device.type == "hpu" else torch.float64


def compile_backend(accelerator: str) -> str:
    """torch.compile's backend: Habana's on HPU (inductor does not take HPU tensors: Habana's support matrix),
    inductor elsewhere."""
    return "hpu_backend" if accelerator == "hpu" else "inductor"


def draws_before_forward(device: torch.device) -> bool:
    """Whether a training step draws its masks and layer drops before the forward (``model.draw``): off the CPU,
    where nothing else draws from the CPU generator during the forward (dropout uses the device's), so the numbers
    are the forward's own, without its host syncs (the mask built after copying the padding mask back, an
    ``.item()`` per layer) and compiled-graph breaks. On the CPU dropout draws from it too, so the forward draws,
    in torchaudio's order."""
    return device.type != "cpu"


def make_optimizer(name: str, params, lr: float, betas, eps: float, weight_decay: float, device_type: str):
    """``adamw``: torch AdamW. ``fusedadamw``: Habana FusedAdamW on HPU, ``AdamW(fused=True)`` elsewhere
    (fused CUDA/CPU kernels, same update)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name != "fusedadamw":
        raise ValueError(f"unknown optimizer {name!r}: use adamw or fusedadamw")
    if device_type == "hpu":
        from habana_frameworks.torch.hpex.optimizers import FusedAdamW

        return FusedAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)


IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")  # torch optimizers' kernel choices


def portable_optimizer_state(saved: dict, target: torch.optim.Optimizer) -> dict:
    """An AdamW state dict (torch's ``AdamW`` or Habana's ``FusedAdamW``) in ``target``'s layout, so a run resumes
    across the two (bias-corrected AdamW, decoupled weight decay). torch keeps the step count in each parameter's
    state (a tensor), counting the updates in which it had a gradient; FusedAdamW one per param group (``step``,
    with ``correct_bias``), counting every update, and 0 in each parameter's state (so with layer drop the two
    differ by design, converted or not). Group settings the target lacks are dropped, those it has and the
    checkpoint lacks come from its defaults, as do its kernel choices (``fused``, ``foreach``: --optimizer
    decides). Loaded as it was, a Habana state trained with bias correction from step 0 again, and a torch state
    failed in FusedAdamW."""
    to_habana = "correct_bias" in target.defaults
    groups, state = [], {idx: dict(entry) for idx, entry in saved["state"].items()}
    for group in saved["param_groups"]:
        from_habana = "correct_bias" in group
        if from_habana and not group["correct_bias"] and not to_habana:
            raise ValueError("the checkpoint's FusedAdamW ran without bias correction (correct_bias=False), which "
                             "torch's AdamW cannot continue: resume it with --optimizer fusedadamw on --hpus")
        mine = [state[idx] for idx in group["params"] if idx in state]
        extra = ("params", "initial_lr", "step") if to_habana else ("params", "initial_lr")  # not in defaults
        kept = {k: v for k, v in group.items() if k not in IMPLEMENTATION and (k in target.defaults or k in extra)}
        if to_habana and not from_habana:
            kept.update(step=int(max((float(entry["step"]) for entry in mine), default=0)), correct_bias=True)
        for entry in mine if to_habana != from_habana else ():
            entry["step"] = 0 if to_habana else torch.tensor(float(group["step"]), dtype=torch.float32)
        groups.append({**target.defaults, **kept})
    return {"state": state, "param_groups": groups}


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float, fused: bool, device_type: str):
    """Global L2 clip; returns the norm before clipping. ``fused``: Habana FusedClipNorm on HPU, the
    ``foreach`` multi-tensor kernels elsewhere."""
    params = [p for p in params if p.grad is not None]
    if fused and device_type == "hpu":
        from habana_frameworks.torch.hpex.normalization import FusedClipNorm

        return FusedClipNorm(params, max_norm).clip_norm(params)
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True if fused else None)
