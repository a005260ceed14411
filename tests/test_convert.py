"""conv2d <-> conv1d conversion of weights and optimizer moments, weight-norm names, and rebuilding from a
state dict."""
import warnings

import pytest
import torch

from model.convert import is_conv_weight
from model import (convert_conv_layout, convert_optimizer_state, convert_weight_norm, hubert_pretrain_model,
                   hubert_pretrain_tiny, infer_arch, model_from_state_dict, strip_prefix)
from tests.numerics import assert_same_math, float64_copies
from tests.test_model import SMALL, make_batch

pytestmark = pytest.mark.numerics  # run again under ATEN_CPU_CAPABILITY=default by make test


def test_state_dict_round_trip_and_shapes():
    conv1d = hubert_pretrain_tiny()
    conv2d = hubert_pretrain_tiny(use_conv2d=True)
    state2d = convert_conv_layout(conv1d.state_dict(), use_conv2d=True)
    conv2d.load_state_dict(state2d)  # strict: every shape fits the conv2d model
    assert state2d["wav2vec2.feature_extractor.conv_layers.0.conv.weight"].shape == (64, 1, 1, 10)
    assert state2d["wav2vec2.feature_extractor.conv_layers.6.conv.weight"].shape == (64, 64, 1, 2)
    back = convert_conv_layout(conv2d.state_dict(), use_conv2d=False)
    for key, value in conv1d.state_dict().items():
        assert torch.equal(back[key], value), key
    # Prefixed keys (Lightning's "model.") convert too; the input is left alone.
    prefixed = {f"model.{k}": v for k, v in conv1d.state_dict().items()}
    converted = convert_conv_layout(prefixed, use_conv2d=True)
    assert converted["model.wav2vec2.feature_extractor.conv_layers.3.conv.weight"].ndim == 4
    assert prefixed["model.wav2vec2.feature_extractor.conv_layers.3.conv.weight"].ndim == 3


def test_optimizer_moments_follow_the_conv_layout():
    model = hubert_pretrain_model(**SMALL, use_conv2d=True, no_layerdrop=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logit_m, _, pen = model(*make_batch(20))
    (logit_m.logsumexp(-1).sum() + pen).backward()
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    state1d = convert_optimizer_state(opt.state_dict(), names, use_conv2d=False)
    assert len(state1d["state"]) == len(names)
    for idx, (name, param) in enumerate(model.named_parameters()):
        expected_ndim = 3 if is_conv_weight(name) else param.ndim
        assert state1d["state"][idx]["exp_avg"].ndim == expected_ndim, name
    # The live optimizer is untouched, and the round trip restores it exactly.
    conv0 = names.index("wav2vec2.feature_extractor.conv_layers.0.conv.weight")
    assert opt.state_dict()["state"][conv0]["exp_avg"].ndim == 4
    state2d = convert_optimizer_state(state1d, names, use_conv2d=True)
    opt.load_state_dict(state2d)
    for idx in state2d["state"]:
        assert torch.equal(state2d["state"][idx]["exp_avg_sq"], opt.state_dict()["state"][idx]["exp_avg_sq"])


def test_model_from_state_dict_infers_the_architecture():
    source = hubert_pretrain_tiny(num_classes=37, use_conv2d=True)
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    state = strip_prefix(state)
    assert infer_arch(state) == "hubert_pretrain_tiny"
    rebuilt = model_from_state_dict(state)
    assert rebuilt.config["use_conv2d"] is False and rebuilt.config["num_classes"] == 37
    source.eval().double(), rebuilt.eval().double()
    waveforms = torch.randn(1, 16000, dtype=torch.float64)
    with torch.no_grad():
        a = source.wav2vec2.extract_features(waveforms, num_layers=2)[0][-1]
        b = rebuilt.wav2vec2.extract_features(waveforms, num_layers=2)[0][-1]
    assert_same_math(a, b)


def test_model_from_state_dict_with_saved_config():
    source = hubert_pretrain_model(**SMALL)
    rebuilt = model_from_state_dict(source.state_dict(), source.config, use_conv2d=True)
    assert rebuilt.wav2vec2.feature_extractor.conv_layers[0].conv.weight.ndim == 4
    # Configs saved before the HPU graph break left the model still carry its flag.
    old_config = {**source.config, "recompilation_optimization": True}
    assert "recompilation_optimization" not in model_from_state_dict(source.state_dict(), old_config).config


def test_unknown_architecture_is_a_clear_error():
    state = hubert_pretrain_model(**SMALL).state_dict()
    with pytest.raises(ValueError, match="no known HuBERT architecture has 3 layers of width 64"):
        model_from_state_dict(state)


def test_legacy_weight_norm_names_load_into_torchaudio_20s_positional_conv():
    """torchaudio 2.0.1 (and Habana's model) wrap the positional conv in the old ``nn.utils.weight_norm``:
    ``weight_g`` / ``weight_v``. Our legacy names load into such a conv and give our conv's output; either
    naming rebuilds our model."""
    model = hubert_pretrain_tiny()
    legacy = convert_weight_norm({f"model.{k}": v for k, v in model.state_dict().items()}, legacy=True)
    prefix = "model.wav2vec2.encoder.transformer.pos_conv_embed.conv."
    assert {k[len(prefix):] for k in legacy if k.startswith(prefix)} == {"bias", "weight_g", "weight_v"}
    ours = model.wav2vec2.encoder.transformer.pos_conv_embed.conv
    old = torch.nn.Conv1d(ours.in_channels, ours.out_channels, ours.kernel_size, padding=ours.padding,
                          groups=ours.groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated, still what 2.0.1 used
        old = torch.nn.utils.weight_norm(old, name="weight", dim=2)
    old.load_state_dict({k[len(prefix):]: v for k, v in legacy.items() if k.startswith(prefix)})
    x = torch.randn(2, ours.in_channels, 50, dtype=torch.float64)
    (ours64,) = float64_copies(ours)
    assert_same_math(old.double()(x), ours64(x))
    rebuilt = model_from_state_dict(strip_prefix(legacy), model.config)
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    assert convert_weight_norm(legacy, legacy=False).keys() == {f"model.{k}" for k in model.state_dict()}
