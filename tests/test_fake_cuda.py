"""Device placement without a GPU: the pre-training step (static and dynamic paths), the fine-tuning forward and
the HuBERT feature extractor run with every parameter and input as a fake ``cuda`` tensor (torch's FakeTensorMode:
shapes, dtypes and devices, no data). An op that mixes a CPU tensor (other than a 0-d scalar) with a CUDA one
raises, and a log of every op shows which ran on the CPU and which stop the host (boolean indexing: a nonzero;
host-to-device copies).

What it cannot see: the numbers; the host-side draws (masks, layer drops), made beforehand on the CPU by
``model.draw`` as lightning.py does off the CPU (fake tensors hold no data to draw from); backward (the autograd
engine needs a real CUDA context; autograd computes each gradient on its forward tensor's device, and our one
custom Function, GradMultiply, scales in place); CUDA autocast (disabled without a GPU: bf16 is covered on CPU);
the CTC loss kernel (no fake implementation: its inputs' devices are checked).
"""
from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_finetune import HuBERTFineTuneModule
from loss import compute_accuracy, compute_accuracy_static, hubert_loss, hubert_loss_static
from model import hubert_pretrain_tiny
from utils.feature_utils import layer_features

aten = torch.ops.aten


def fake_cuda_runs_here() -> str:
    """'' where fake tensors move to ``cuda`` without a GPU; else torch's error (torch 2.7 initialises the CUDA
    driver for it: these tests then need a GPU machine)."""
    try:
        with FakeTensorMode() as mode:
            mode.from_tensor(torch.zeros(1)).to("cuda")
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return ""


FAKE_CUDA_ERROR = fake_cuda_runs_here()
pytestmark = pytest.mark.skipif(bool(FAKE_CUDA_ERROR), reason=f"torch {torch.__version__}: fake CUDA tensors need "
                                f"the CUDA driver ({FAKE_CUDA_ERROR})")
LENGTHS = [32000, 26000, 23001]
STATIC = dict(static_layerdrop=True, static_indexing=True, static_logit_generator=True)


class OpLog(TorchDispatchMode):
    """Every op's CPU outputs, host syncs (boolean indexing, nonzero, .item()) and host-to-device copies."""

    def __init__(self):
        super().__init__()
        self.cpu_outputs, self.syncs, self.to_device = Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in outputs):
            self.cpu_outputs[f"{func} {[tuple(t.shape) for t in outputs]}"] += 1
        if func in (aten.nonzero.default, aten._local_scalar_dense.default) or (
                func in (aten.index.Tensor, aten.index_put_.default)
                and any(t is not None and t.dtype == torch.bool for t in args[1])):
            self.syncs[str(func)] += 1
        if outputs and outputs[0].device.type == "cuda" and any(t.device.type == "cpu" and t.dim() > 0 for t in inputs):
            self.to_device[str(tuple(next(t.shape for t in inputs if t.device.type == "cpu" and t.dim() > 0)))] += 1
        return out


def on_fake_cuda(mode, module):
    """The module's parameters and buffers as fake CUDA tensors (module.to() cannot swap in fake tensors)."""
    return {k: mode.from_tensor(v).to("cuda") for k, v in [*module.named_parameters(), *module.named_buffers()]}


def batch(num_classes=100):
    g = torch.Generator().manual_seed(0)
    waveforms = torch.randn(len(LENGTHS), max(LENGTHS), generator=g)
    labels = torch.randint(0, num_classes, (len(LENGTHS), (max(LENGTHS) - 400) // 320 + 1), generator=g)
    return waveforms, labels, torch.tensor(LENGTHS)


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_pretraining_step_runs_on_cuda_alone(static):
    model = hubert_pretrain_tiny(**(STATIC if static else {}))
    torch.manual_seed(0)
    draws = model.draw(LENGTHS)
    # Boolean indexing (the dynamic path) has data-dependent shapes: symbolic sizes there, none allowed static.
    mode = FakeTensorMode(allow_non_fake_inputs=False, shape_env=None if static else ShapeEnv())
    with mode:
        params = on_fake_cuda(mode, model)
        inputs = [mode.from_tensor(t).to("cuda") for t in batch()]
        # dynamic layer drop skips layers by host bools (the list stays real); static takes them to the device
        draws = draws._replace(mask=mode.from_tensor(draws.mask),
                               dropped=mode.from_tensor(draws.dropped) if static else draws.dropped)
        with OpLog() as log:
            out = torch.func.functional_call(model, params, (*inputs, draws))
            if static:
                loss = hubert_loss_static(*out, unmasked_weight=0.5)
                counts = [*compute_accuracy_static(out[0], out[1]), *compute_accuracy_static(out[0], out[2])]
            else:
                loss = hubert_loss(*out, unmasked_weight=0.5)
                counts = [*compute_accuracy(out[0]), *compute_accuracy(out[1])]
    assert {t.device.type for t in [*out, loss, *counts]} == {"cuda"}
    assert loss.dtype == torch.float32 and loss.shape == ()
    if static:  # fixed shapes: no op on the CPU, nothing stops the host but the two copies of the draws
        assert not log.cpu_outputs and not log.syncs
        assert log.to_device == {"(3, 99)": 1, f"({len(model.wav2vec2.encoder.transformer.layers)},)": 1}
    else:  # the padding-zeroing and mask writes, and one nonzero per logit selection (masked, unmasked)
        assert list(log.cpu_outputs) == ["aten.lift_fresh.default [()]"]  # the 0-d 0.0 written to padding
        assert log.syncs == {"aten.index_put_.default": 2, "aten.nonzero.default": 2}
        assert sum(log.to_device.values()) == 1  # the span mask


def test_finetuning_forward_runs_on_cuda_alone():
    module = HuBERTFineTuneModule(
        checkpoint=None, model_name="hubert_pretrain_tiny", train_folders=[], valid_folders=[],
        model_overrides=dict(mask_prob=0.65, mask_channel_prob=0.5, mask_channel_length=64, encoder_layer_drop=0.1),
        seconds_per_batch=10, learning_rate=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0, clip_norm=10,
        freeze_encoder_updates=0, warmup_updates=1, hold_updates=1, decay_updates=1)
    module.train()
    torch.manual_seed(0)
    draws = module.model.draw(LENGTHS)
    assert draws.channels is not None and draws.channels.shape == (3, 256)
    waveforms, _, lengths = batch()
    labels, label_lengths = torch.randint(1, 29, (3, 20)), torch.tensor([20, 15, 9])
    with FakeTensorMode(allow_non_fake_inputs=False, shape_env=ShapeEnv()) as mode:
        params = on_fake_cuda(mode, module)
        draws = draws._replace(mask=mode.from_tensor(draws.mask), channels=mode.from_tensor(draws.channels))
        w, n, y, y_len = (mode.from_tensor(t).to("cuda") for t in (waveforms, lengths, labels, label_lengths))
        with OpLog() as log:
            log_probs, out_len = torch.func.functional_call(module, params, (w, n, draws))
    assert log_probs.device.type == out_len.device.type == "cuda" and log_probs.dtype == torch.float32
    assert log_probs.shape[:2] == (99, 3)
    assert {t.device.type for t in (y, y_len)} == {"cuda"}  # what module.ctc_loss gets besides the above
    assert list(log.cpu_outputs) == ["aten.lift_fresh.default [()]"] and sum(log.to_device.values()) == 2


def test_feature_extractor_runs_on_cuda_and_hands_back_cpu_features():
    """preprocess.py --use-gpu: layer 2 of a pre-trained model, its features returned on the CPU."""
    wav2vec2 = hubert_pretrain_tiny().wav2vec2.eval()
    waveform = torch.randn(16000)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        with _reparametrize_module(wav2vec2, on_fake_cuda(mode, wav2vec2)), OpLog() as log:
            features = layer_features(wav2vec2, mode.from_tensor(waveform), 2, torch.device("cuda"))
    assert features.device.type == "cpu" and features.shape == (49, 256) and features.dtype == torch.float32
    # On the CPU: the input gaining its batch axis before its copy, and the copy back of the features.
    assert list(log.cpu_outputs) == ["aten.unsqueeze.default [(1, 16000)]", "aten.to.dtype_layout [(49, 256)]"]
    assert not log.syncs and log.to_device == {"(1, 16000)": 1}
