"""utils/device.py on a machine without HPU or GPU: clear errors, the CPU fallbacks, lightning-habana importable,
the HPU graph breaks handed into the model."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from pytorch_lightning.strategies import DDPStrategy, ParallelStrategy

from bench import cpu_allocator
import lightning  # our LightningModule file: the name that confuses lightning-habana
import train
import utils.device
import utils.habana_env
from tests.fixtures import make_prepared_dataset
from tests.test_model import make_batch
from tests.test_train import args_for, last_ckpt
from utils.checkpoint import load_checkpoint
from utils.device import (Precision, check_devices, clip_grad_norm, compile_backend, describe_machine,
                          hide_our_lightning_module, import_lightning_habana, make_optimizer, resolve_precision)

REPO = Path(__file__).resolve().parents[1]


def test_our_lightning_py_is_hidden_from_lightning_habana():
    """lightning-habana asks ``module_available("lightning")`` to pick its Lightning flavour; ours must say no
    while it imports, and be back afterwards."""
    from lightning_utilities.core.imports import module_available

    assert module_available.__wrapped__("lightning")  # our lightning.py would be taken for the package
    with hide_our_lightning_module():
        assert not module_available.__wrapped__("lightning")
    assert sys.modules["lightning"] is lightning


def test_missing_lightning_habana_is_a_clear_error():
    with pytest.raises(SystemExit, match="--hpus needs lightning-habana built for pytorch-lightning"):
        import_lightning_habana()


def stand_in_lightning_habana(monkeypatch, **strategies):
    """lightning-habana's module layout with the strategy classes of one of its releases (it cannot be
    installed here: it needs habana_frameworks)."""
    for name in ("lightning_habana", "lightning_habana.pytorch", "lightning_habana.pytorch.accelerator",
                 "lightning_habana.pytorch.strategies"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["lightning_habana.pytorch.accelerator"].HPUAccelerator = type("HPUAccelerator", (), {})
    module = sys.modules["lightning_habana.pytorch.strategies"]
    module.SingleHPUStrategy = type("SingleHPUStrategy", (), {})
    for name, base in strategies.items():
        setattr(module, name, type(name, (base,), {}))


@pytest.mark.parametrize("release, strategies", [
    ("1.4", {"HPUParallelStrategy": DDPStrategy}),
    ("1.6", {"HPUParallelStrategy": DDPStrategy, "HPUDDPStrategy": DDPStrategy}),
    ("1.7", {"HPUParallelStrategy": ParallelStrategy, "HPUDDPStrategy": DDPStrategy}),
], ids=["1.4", "1.6", "1.7"])
def test_hpu_cards_train_with_a_ddp_strategy_of_any_lightning_habana(monkeypatch, release, strategies):
    """lightning-habana 1.7 turned HPUParallelStrategy (Habana's recipe's choice) into a plain ParallelStrategy:
    no gradient all-reduce. HPUDDPStrategy is taken where it exists, with Habana's DDP arguments."""
    stand_in_lightning_habana(monkeypatch, **strategies)
    _, strategy = utils.device.hpu_accelerator_and_strategy(8, 1, single=False, find_unused_parameters=True)
    assert isinstance(strategy, DDPStrategy)
    assert type(strategy).__name__ == ("HPUParallelStrategy" if release == "1.4" else "HPUDDPStrategy")
    assert strategy._ddp_kwargs == {"broadcast_buffers": False, "gradient_as_bucket_view": True,
                                    "find_unused_parameters": True}


def test_a_lightning_habana_without_ddp_is_refused(monkeypatch):
    stand_in_lightning_habana(monkeypatch, HPUParallelStrategy=ParallelStrategy)
    with pytest.raises(SystemExit, match="has no DDP strategy .HPUParallelStrategy does not all-reduce"):
        utils.device.hpu_accelerator_and_strategy(8, 1, single=False, find_unused_parameters=True)


def test_missing_devices_name_what_is_there():
    assert describe_machine().startswith("CPU (")
    with pytest.raises(SystemExit, match=r"asked for 2 GPU\(s\), but this machine has CPU .*--accelerator cpu"):
        check_devices("gpu", 2)
    check_devices("cpu", 2)  # CPU processes are always available
    # A GPU machine whose driver is older than this torch's CUDA build also reports no GPU: say so.
    with pytest.raises(SystemExit, match=rf"built for CUDA {torch.version.cuda}: .* nvidia-smi"):
        check_devices("gpu", 1)


def test_auto_precision_is_fp32_on_gpus_without_bf16(monkeypatch):
    """Turing (T4) emulates bf16, slower than fp32 (hardware queries stood in for: this machine has no GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", "gpu", False) == Precision(autocast=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", "gpu", False) == Precision(autocast=True, tf32=True)


def test_fused_optimizer_and_clip_fall_back_off_hpu():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = make_optimizer("fusedadamw", params, 1e-3, (0.9, 0.98), 1e-6, 0.01, "cpu")
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    norm = clip_grad_norm(params, 1.0, fused=True, device_type="cpu")
    assert norm == pytest.approx((5 * 9) ** 0.5)  # five gradients of 3
    assert torch.cat([p.grad for p in params]).norm() == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("sgd", params, 1e-3, (0.9, 0.98), 1e-6, 0.01, "cpu")


@pytest.mark.parametrize("recompilation_optimization", [True, False])
def test_training_hands_hpu_graph_breaks_into_the_model(monkeypatch, recompilation_optimization):
    """--recompilation-optimization: Habana's mark_step before the first layer and after every layer, in
    training only (``mark_step`` stands in for the HPU runtime, which this machine lacks)."""
    module = lightning.HuBERTPreTrainModule(
        model_name="hubert_pretrain_tiny", feature_grad_mult=0.1, num_classes=20, dataset="librispeech",
        dataset_path="unused", feature_type="mfcc", seconds_per_batch=10, learning_rate=1e-3, betas=(0.9, 0.98),
        eps=1e-6, weight_decay=0.01, clip_norm=10.0, warmup_updates=1, max_updates=2, static_layerdrop=True,
        recompilation_optimization=recompilation_optimization)
    breaks = []
    monkeypatch.setattr(utils.device, "mark_step", lambda x: breaks.append(x.shape))
    batch = make_batch(20, n=8000)
    module.model.train()(*batch)
    num_layers = len(module.model.wav2vec2.encoder.transformer.layers)
    assert len(breaks) == (num_layers + 1 if recompilation_optimization else 0)
    breaks.clear()
    with torch.no_grad():
        module.model.eval()(*batch)
    assert not breaks


@pytest.mark.parametrize("choice, accelerator, autocast, expected", [
    ("auto", "gpu", False, Precision(autocast=True, tf32=True)),  # upstream's GPU runs always used autocast
    ("auto", "gpu", True, Precision(autocast=True, tf32=True)),
    ("fp32", "gpu", False, Precision(autocast=False, tf32=False)),
    ("bf16", "gpu", False, Precision(autocast=True, tf32=True)),
    ("auto", "hpu", False, Precision(autocast=False)),  # the seed's --hpus runs: --autocast decides
    ("auto", "hpu", True, Precision(autocast=True)),
    ("bf16", "hpu", False, Precision(autocast=True)),
    ("auto", "cpu", False, Precision(autocast=False)),
    ("auto", "cpu", True, Precision(autocast=True)),
    ("bf16", "cpu", False, Precision(autocast=True)),
    ("fp32", "cpu", False, Precision(autocast=False)),
])
def test_precision_for_each_device_and_flag(choice, accelerator, autocast, expected):
    assert resolve_precision(choice, accelerator, autocast) == expected


BF16_ATTENTION = """
import torch
from utils.device import configure_process, fast_cpu_bf16, resolve_precision
configure_process(resolve_precision("bf16", "cpu", False), "cpu")
x = torch.randn(2, 4, 300, 64)  # 300 frames: torch's flash kernel packs blocks (50 would not)
with torch.autocast("cpu", dtype=torch.bfloat16):
    torch.nn.functional.scaled_dot_product_attention(x, x, x)
print("bf16 attention runs; the tiny recipe picks bf16:", fast_cpu_bf16())
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "native"])
def test_cpu_bf16_attention_runs_under_any_cpu_capability(capability):
    """Under a lowered ATEN_CPU_CAPABILITY on an AMX CPU, torch 2.11's bf16 flash attention raises ("pack_vnni2
    is only supported when avx512 is supported"): the tiny recipe's bf16 default and the seed's --autocast turned
    every CPU training run there into that crash. Now training takes the math kernel there, and the tiny recipe
    fp32 (bf16 is its speed-up only with the AVX-512 kernels)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    if capability == "native":
        env.pop("ATEN_CPU_CAPABILITY")
    done = subprocess.run([sys.executable, "-c", BF16_ATTENTION], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("bf16 attention runs")


def test_precision_conflicts_and_descriptions():
    with pytest.raises(ValueError, match="--autocast asks for bf16 autocast, --precision fp32 for none"):
        resolve_precision("fp32", "gpu", True)
    assert resolve_precision("auto", "gpu", False).describe("gpu") == "bf16 autocast, TF32 matmuls for the fp32 rest"
    assert "op lists" in resolve_precision("auto", "hpu", True).describe("hpu")
    assert resolve_precision("auto", "cpu", False).describe("cpu") == "fp32 (no autocast)"



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_stops_faulting_activations_back_in():
    """A tiny-model training step: glibc's defaults hand its activation buffers back to the OS and fault them in
    again on the next step; tuned, the process keeps them (measured: ~18 k vs ~4 k page faults per step)."""
    medians = cpu_allocator.main(["--steps", "2", "--rounds", "1"])
    assert medians["tuned"]["faults"] < medians["default"]["faults"] / 2, medians


def import_script(script, argv, expression):
    """``expression`` after importing ``script`` with ``argv`` in a fresh interpreter, as a user starts it."""
    code = (f"import sys; sys.argv = {[script + '.py', *argv]!r}; import {script}, os, utils.habana_env as h; "
            f"print({expression})")
    env = {k: v for k, v in os.environ.items() if not k.endswith("LIST")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.parametrize("script", ["train", "finetune"])
def test_hpu_op_lists_are_set_before_torch_loads(script):
    """Gaudi software >= 1.18 loads Habana's bridge with ``import torch``, and it reads the op lists then: the
    scripts set them from their command line before they import torch."""
    custom = ["--autocast-bf16", "my_bf16.txt"] if script == "train" else []
    got = import_script(script, ["--hpus", "8", "--autocast", *custom], "h.TORCH_WAS_LOADED, "
                        "os.environ['PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST'], os.environ['FP32_LIST']")
    bf16 = "my_bf16.txt" if custom else "ops_bf16_hubert.txt"
    assert got == ["False", str(REPO / bf16), str(REPO / "ops_fp32_hubert.txt")]
    assert import_script(script, ["--autocast"], "'LOWER_LIST' in os.environ") == ["False"]  # without --hpus


def test_op_lists_named_after_the_bridge_loaded_stop_the_run(monkeypatch):
    for lower, fp32 in utils.habana_env.AUTOCAST_VARS:
        monkeypatch.setenv(lower, "habana_default_bf16")
        monkeypatch.setenv(fp32, "habana_default_fp32")
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch", types.ModuleType("habana_frameworks.torch"))
    with pytest.raises(SystemExit, match="bridge was loaded before its autocast op lists were set, so they would be "
                                         "ignored: export PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST=a.txt"):
        utils.device.set_hpu_autocast_lists("a.txt", "b.txt")
    utils.habana_env.set_op_lists("a.txt", "b.txt")  # exported by the user, or set before torch: fine
    utils.device.set_hpu_autocast_lists("a.txt", "b.txt")


def test_compile_backend_is_habanas_on_hpu():
    assert [compile_backend(a) for a in ("hpu", "gpu", "cpu")] == ["hpu_backend", "inductor", "inductor"]


def test_gpu_features_are_exact_fp32():
    """preprocess.py --use-gpu: torch's default cuDNN TF32 would make GPU features differ from CPU ones."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        utils.device.exact_fp32()
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.numerics
def test_deterministic_flag_switches_torch_to_deterministic_kernels(tmp_path, monkeypatch):
    """--deterministic turns on torch's deterministic algorithms and cuBLAS's fixed workspace (what GPUs need for
    bit-exact resumes); a whole CPU run has a deterministic kernel for every op, and the same numbers as without."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    data = make_prepared_dataset(tmp_path / "d", n_train=4, n_valid=1)
    common = ["--max-updates", "2", "--warmup-updates", "1", "--seconds-per-batch", "16"]
    train.main(args_for(data, tmp_path / "plain", *common))
    try:
        train.main(args_for(data, tmp_path / "deterministic", *common, "--deterministic"))
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
    plain, deterministic = (load_checkpoint(last_ckpt(tmp_path / run)) for run in ("plain", "deterministic"))
    for key, value in plain["state_dict"].items():
        assert torch.equal(deterministic["state_dict"][key], value), key
