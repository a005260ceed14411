"""Our HuBERT against torchaudio 2.11's: same weights in, same numbers out (compared in float64; see
tests/numerics.py)."""
import pytest
import torch
import torchaudio
from torchaudio.models.wav2vec2 import model as ta_model_module

import model.hubert as our_hubert
from model import (convert_conv_layout, hubert_pretrain_base, hubert_pretrain_large, hubert_pretrain_model,
                   hubert_pretrain_tiny, hubert_pretrain_xlarge)
from model.logits import LOGIT_TEMP
from tests.numerics import assert_fp32_close, assert_same_math, float64_copies
from utils.versions import release

pytestmark = pytest.mark.numerics  # run again under ATEN_CPU_CAPABILITY=default by make test

HABANA_FLAGS = dict(use_conv2d=True, use_instancenorm=True, static_indexing=True, static_layerdrop=True,
                    static_logit_generator=True, split_logits=True, use_max_sub_softmax_opt=True)

# A small custom config through torchaudio's builder: LayerNorm extractor and pre-LN, i.e. the Large path.
SMALL = dict(
    extractor_mode="layer_norm", extractor_conv_layer_config=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
    extractor_conv_bias=True, encoder_embed_dim=64, encoder_projection_dropout=0.1, encoder_pos_conv_kernel=16,
    encoder_pos_conv_groups=4, encoder_num_layers=3, encoder_num_heads=4, encoder_attention_dropout=0.1,
    encoder_ff_interm_features=128, encoder_ff_interm_dropout=0.1, encoder_dropout=0.1,
    encoder_layer_norm_first=True, encoder_layer_drop=0.1, mask_prob=0.8, mask_selection="static",
    mask_other=0.0, mask_length=10, no_mask_overlap=False, mask_min_space=1, mask_channel_prob=0.0,
    mask_channel_selection="static", mask_channel_other=0.0, mask_channel_length=10,
    no_mask_channel_overlap=False, mask_channel_min_space=1, skip_masked=False, skip_nomask=False,
    num_classes=20, final_dim=16, feature_grad_mult=0.1,
)


def assert_logits_close(ours, ref, torchaudio_logits=True):
    """Equal where finite, and ``-inf`` at the same places (the target's own class). Float64 models: ours
    against ours is the same math; torchaudio computes its logits in fp32 whatever the model (``.float()``), so
    against them the difference is their fp32 rounding of a cosine, on the logit scale ``1 / LOGIT_TEMP``."""
    assert ours.shape == ref.shape
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    if torchaudio_logits:
        assert_fp32_close(ours[finite], ref[finite], scale=1 / LOGIT_TEMP)
    else:
        assert_same_math(ours[finite], ref[finite])


def make_batch(num_classes, seed=0, n=32000, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    waveforms = torch.randn(3, n, generator=g).to(dtype)
    lengths = torch.tensor([n, n - 6000, n - 9999])
    labels = torch.randint(0, num_classes, (3, (n - 400) // 320 + 1), generator=g)
    return waveforms, labels, lengths


def float64_pair(ref, build, **flags):
    """Float64 copies of torchaudio's model and of ours built with ``flags`` and loaded with its weights."""
    ours = build(**flags)
    ours.load_state_dict(convert_conv_layout(ref.state_dict(), flags.get("use_conv2d", False)))
    return float64_copies(ref)[0], ours.double()


def run_static(model, batch):
    """Our static forward, split back into (logit_m, logit_u, penalty) for comparison."""
    logits, mask_m, mask_u, pen = model(*batch)
    return logits[mask_m.flatten()], logits[mask_u.flatten()], pen


@pytest.fixture(scope="module", params=["base", "small"])
def reference(request):
    torch.manual_seed(0)
    if request.param == "base":
        return request.param, torchaudio.models.hubert_pretrain_base(), lambda **f: hubert_pretrain_base(**f)
    return (request.param, torchaudio.models.hubert_pretrain_model(**SMALL),
            lambda **f: hubert_pretrain_model(**SMALL, **f))


def assert_same_training_logits(ref, ours, batch):
    """Training mode, same seed: the same masks, dropout and layer drop, so the same logits."""
    ref.train(), ours.train()
    torch.manual_seed(11)
    expected = ref(*batch)
    torch.manual_seed(11)
    got = ours(*batch)
    for a, b in zip(got[:2], expected[:2]):
        assert_logits_close(a, b)


def layer_features(ref, ours, batch):
    """(ours, torchaudio's) inputs to the first transformer layer and outputs of the first two layers."""
    with torch.no_grad():
        feats_ref, len_ref = ref.wav2vec2.extract_features(batch[0], batch[2], num_layers=2)
        feats, lens = ours.wav2vec2.extract_features(batch[0], batch[2], num_layers=2)
        # layer 0 (torchaudio refuses it): what torchaudio's first layer reads
        x, _ = ref.wav2vec2.encoder._preprocess(*ref.wav2vec2.feature_extractor(batch[0], batch[2]))
        input_ref = ref.wav2vec2.encoder.transformer._preprocess(x)
        (input_ours,), _ = ours.wav2vec2.extract_features(batch[0], batch[2], num_layers=0)
    assert torch.equal(lens, len_ref) and len(feats) == len(feats_ref) == 2
    return [input_ours, *feats], [input_ref, *feats_ref]


@pytest.mark.parametrize("flags", [{}, HABANA_FLAGS], ids=["default", "habana"])
def test_eval_logits_and_features_match_torchaudio(reference, flags):
    _, ref, build = reference
    ref, ours = float64_pair(ref, build, **flags)
    ref.eval(), ours.eval()
    batch = make_batch(ref.logit_generator.label_embeddings.shape[0], dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(3)
        expected = ref(*batch)
        torch.manual_seed(3)
        got = run_static(ours, batch) if flags else ours(*batch)
    assert_logits_close(got[0], expected[0])
    assert_logits_close(got[1], expected[1])
    assert_fp32_close(got[2], expected[2])  # torchaudio's feature penalty is fp32 too
    for i, (a, b) in enumerate(zip(*layer_features(ref, ours, batch))):
        assert_same_math(a, b, msg=f"layer {i}")
    with pytest.raises(ValueError, match="between"):
        ours.wav2vec2.extract_features(batch[0], batch[2], num_layers=-1)


def test_the_float64_comparison_sees_one_fp32_ulp_in_one_weight():
    """What the tight float64 tolerance buys: moving one weight of one layer by one fp32 ulp fails it (the
    fp32 comparison at atol 1e-5 it replaced let that through, and failed on some CPUs without any change)."""
    torch.manual_seed(0)
    ref, ours = float64_pair(torchaudio.models.hubert_pretrain_model(**SMALL),
                             lambda **f: hubert_pretrain_model(**SMALL, **f))
    ref.eval(), ours.eval()
    batch = make_batch(20, dtype=torch.float64)
    weight = ours.wav2vec2.encoder.transformer.layers[1].feed_forward.output_dense.weight
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0].float(), torch.tensor(float("inf"))).double()
    (*same, changed), (*expected, reference) = layer_features(ref, ours, batch)
    for a, b in zip(same, expected):  # the input and layer 1 do not read that weight
        assert_same_math(a, b)
    with pytest.raises(AssertionError, match="not close"):
        assert_same_math(changed, reference)
    assert_fp32_close(changed.float(), reference.float())  # a fp32 tolerance could not have told


def test_same_seed_same_init_as_torchaudio(reference):
    """Built under the same seed, every tensor equals torchaudio's: same modules, same order, same init."""
    name, ref, build = reference
    torch.manual_seed(0)
    ours = build()
    ref_state = ref.state_dict()
    assert ours.state_dict().keys() == ref_state.keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, ref_state[key]), key


def test_training_forward_matches_torchaudio_draw_for_draw(reference):
    """Training mode with dropout and layer drop on: masks, dropout and layer-drop draws all line up."""
    _, ref, build = reference
    ref, ours = float64_pair(ref, build)
    num_classes = ref.logit_generator.label_embeddings.shape[0]
    assert_same_training_logits(ref, ours, make_batch(num_classes, seed=1, dtype=torch.float64))


@pytest.mark.parametrize("ours_flags", [{}, {"no_layerdrop": True}], ids=["layer_drop_0", "no_layerdrop"])
def test_without_layer_drop_the_draws_still_match_torchaudio(ours_flags):
    """Large and X-Large (layer drop 0) and --no-layerdrop: torchaudio still draws one number per layer in
    training, so dropout after the first layer only lines up if ours draws them too."""
    config = {**SMALL, "encoder_layer_drop": 0.0}
    torch.manual_seed(0)
    ref = torchaudio.models.hubert_pretrain_model(**config)
    ref, ours = float64_pair(ref, lambda: hubert_pretrain_model(
        **{**config, "encoder_layer_drop": 0.05} if ours_flags else config, **ours_flags))
    assert_same_training_logits(ref, ours, make_batch(20, seed=1, dtype=torch.float64))


def test_mask_generator_same_masks_as_torchaudio():
    ref = torchaudio.models.hubert_pretrain_base().mask_generator
    ours = hubert_pretrain_base().mask_generator
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 120, 768)
    padding = torch.arange(120)[None, :] >= torch.tensor([120, 100, 57, 99])[:, None]
    for seed in range(5):
        torch.manual_seed(seed)
        x_ref, mask_ref = ref(x.clone(), padding)
        torch.manual_seed(seed)
        x_ours, mask_ours = ours(x.clone(), padding)
        assert torch.equal(mask_ours, mask_ref)
        assert torch.equal(x_ours, x_ref)
        assert (mask_ours & padding).sum() == 0


def test_static_layerdrop_same_outputs_and_gradients_as_dynamic():
    """Deterministic dropouts, layer drop 0.5: the where-based path equals the skip-based one."""
    config = {**SMALL, "encoder_layer_drop": 0.5}
    dynamic = hubert_pretrain_model(**config, all_deterministic=True)
    static = hubert_pretrain_model(**config, all_deterministic=True, static_layerdrop=True, static_indexing=True)
    static.load_state_dict(dynamic.state_dict())
    dynamic.double(), static.double()
    batch = make_batch(20, seed=2, dtype=torch.float64)
    outputs, grads = [], []
    for model in (dynamic, static):
        torch.manual_seed(4)
        logit_m, logit_u, pen = model(*batch)
        loss = torch.nn.functional.cross_entropy(logit_m, torch.zeros(len(logit_m), dtype=torch.long)) + pen
        loss.backward()
        outputs.append((logit_m, logit_u))
        grads.append({n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()})
    for a, b in zip(*outputs):
        assert_logits_close(a, b, torchaudio_logits=False)
    dropped = [n for n, p in dynamic.named_parameters() if p.grad is None]
    assert dropped, "seed 4 should drop at least one layer, or the test proves nothing"
    for name in grads[0]:
        assert_same_math(grads[1][name], grads[0][name], msg=name)


@pytest.mark.parametrize("static", [False, True])
def test_choices_drawn_beforehand_are_the_forwards_own(static):
    """model.draw (what lightning.py does off the CPU) gives the masks and layer drops the forward would draw:
    with deterministic dropouts nothing else uses the CPU generator, so the outputs are the same."""
    flags = dict(static_layerdrop=True, static_indexing=True, static_logit_generator=True) if static else {}
    model = hubert_pretrain_model(**{**SMALL, "encoder_layer_drop": 0.5}, all_deterministic=True, **flags).double()
    waveforms, labels, lengths = make_batch(20, seed=2, dtype=torch.float64)
    torch.manual_seed(4)
    inline = model(waveforms, labels, lengths)
    state = torch.get_rng_state()
    torch.manual_seed(4)
    draws = model.draw(lengths.tolist())
    assert torch.equal(torch.get_rng_state(), state)  # the same numbers of the same kinds
    assert draws.mask.shape == labels.shape and draws.dropped.sum() not in (0, len(draws.dropped))
    beforehand = model(waveforms, labels, lengths, draws)
    for a, b in zip(inline, beforehand):
        assert torch.equal(a, b)
    model.eval()
    assert model.draw(lengths.tolist()).dropped is None


def test_label_length_mismatch_is_a_clear_error():
    model = hubert_pretrain_model(**SMALL)
    waveforms, labels, lengths = make_batch(20)
    with pytest.raises(ValueError, match=r"labels have 100 frames but the model makes 99 frames from 32000 samples"):
        model(waveforms, torch.cat([labels, labels[:, :1]], dim=1), lengths)


def spy_config(monkeypatch, module, name):
    """Capture the keyword arguments a factory passes to the builder (no model is built)."""
    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise StopIteration

    monkeypatch.setattr(module, name, capture)
    return seen


@pytest.mark.parametrize("ours, ref", [
    (hubert_pretrain_base, torchaudio.models.hubert_pretrain_base),
    (hubert_pretrain_large, torchaudio.models.hubert_pretrain_large),
    (hubert_pretrain_xlarge, torchaudio.models.hubert_pretrain_xlarge),
], ids=["base", "large", "xlarge"])
def test_factories_use_upstream_hyperparameters(monkeypatch, ours, ref):
    ref_config = spy_config(monkeypatch, ta_model_module, "hubert_pretrain_model")
    with pytest.raises(StopIteration):
        ref()
    our_config = spy_config(monkeypatch, our_hubert, "hubert_pretrain_model")
    with pytest.raises(StopIteration):
        ours()
    assert our_config == ref_config


def test_large_state_dict_layout_matches_torchaudio():
    ref = torchaudio.models.hubert_pretrain_large().state_dict()
    ours = hubert_pretrain_large().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


# ---- deployment: TorchScript and dynamic quantization, as torchaudio's model tests check them ----------------
# Base's layout (group-norm extractor, post-LN, layer drop) at a width that scripts in seconds.
BASE_NARROW = dict(extractor_conv_layer_config=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
                   encoder_embed_dim=64, encoder_num_layers=3, encoder_num_heads=4, encoder_ff_interm_features=128,
                   encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4, final_dim=16)
ENCODERS = {
    "base": lambda: hubert_pretrain_base(**BASE_NARROW),
    "layer_norm": lambda: hubert_pretrain_model(**SMALL),  # Large's layout
    "habana": lambda: hubert_pretrain_base(**BASE_NARROW, **HABANA_FLAGS),  # conv2d, instance norm, static
}


def deployable(encoder: str, aux: bool):
    """The encoder of a pre-training model in eval mode, with a CTC-style ``aux`` head if asked (fine-tuned)."""
    torch.manual_seed(0)
    wav2vec2 = ENCODERS[encoder]().wav2vec2
    with torch.no_grad():  # every parameter random, so a mixed-up weight cannot hide
        for p in wav2vec2.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if aux:
        wav2vec2.aux = torch.nn.Linear(64, 29)
    return wav2vec2.eval()


def script_save_load(model, path):
    torch.jit.save(torch.jit.script(model), path)
    return torch.jit.load(path)


@pytest.mark.parametrize("encoder, aux", [("base", False), ("base", True), ("layer_norm", True), ("habana", False)])
def test_encoder_scripts_saves_and_loads_with_equal_outputs(tmp_path, encoder, aux):
    model = deployable(encoder, aux)
    state = model.state_dict()
    waveforms, _, lengths = make_batch(20, n=8000)
    lengths[2] = 0  # an empty clip, as torchaudio's zero-length test
    with torch.no_grad():
        expected = model(waveforms, lengths)
        expected_features = model.extract_features(waveforms, lengths, num_layers=2)[0]
        expected_unpadded = model(waveforms, None)[0]
    loaded = script_save_load(model, tmp_path / "model.pt")
    out, out_lengths = loaded(waveforms, lengths)
    assert out.shape[-1] == (29 if aux else 64)
    torch.testing.assert_close(out, expected[0])
    assert torch.equal(out_lengths, expected[1]) and out_lengths[2] == 0
    for a, b in zip(loaded.extract_features(waveforms, lengths, 2)[0], expected_features, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(loaded(waveforms, None)[0], expected_unpadded)
    # The live model keeps its weight norm and parameter names (torchaudio strips them while scripting), and
    # the scripted one has the same names, so it loads checkpoints' weights.
    assert model.state_dict().keys() == state.keys() == loaded.state_dict().keys()
    assert "conv.parametrizations.weight.original0" in dict(model.encoder.transformer.pos_conv_embed.named_parameters())


@pytest.mark.parametrize("encoder", ["base", "habana"])
def test_dynamically_quantized_model_scripts_with_equal_outputs(tmp_path, encoder):
    model = deployable(encoder, aux=True)
    model.encoder.transformer.pos_conv_embed.__prepare_scriptable__()  # what torchaudio's tests call first
    quantized = torch.ao.quantization.quantize_dynamic(model, qconfig_spec={torch.nn.Linear}, dtype=torch.qint8)
    num_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules()) == num_linear
    waveforms, _, lengths = make_batch(20, n=8000)
    with torch.no_grad():
        expected, expected_lengths = quantized(waveforms, lengths)
        full_precision = model(waveforms, lengths)[0]
    out, out_lengths = script_save_load(quantized, tmp_path / "quantized.pt")(waveforms, lengths)
    torch.testing.assert_close(out, expected)  # torchaudio's check: scripting changes nothing
    assert torch.equal(out_lengths, expected_lengths)
    # int8 weights: 3 % from the fp32 model here (another random model: ~100 %), not a different function.
    assert (expected - full_precision).norm() / full_precision.norm() < 0.1


@pytest.mark.skipif(release(torch.__version__) < (2, 11), reason="torch 2.7.1's torch.export rejects the "
                    "encoder's dynamic batch and length (constraint violations); README, Deployment")
def test_encoder_exports_with_torch_export_for_any_batch_and_length(tmp_path):
    """torch 2.11 deprecates TorchScript for torch.export, which takes the same model."""
    model = deployable("base", aux=True)
    waveforms, _, lengths = make_batch(20, n=8000)
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time", min=720)  # two frames or more
    program = torch.export.export(model, (waveforms, lengths), dynamic_shapes=({0: batch, 1: time}, {0: batch}))
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    waveforms, lengths = torch.randn(1, 12345), torch.tensor([12345])  # exported with (3, 8000)
    with torch.no_grad():
        expected = model(waveforms, lengths)
        out = loaded(waveforms, lengths)
    torch.testing.assert_close(out[0], expected[0])
    assert torch.equal(out[1], expected[1])


def test_tiny_masks_five_frame_spans():
    """The tiny recipe's span length (docs/real_speech.md); upstream's sizes keep 10."""
    assert hubert_pretrain_tiny().mask_generator.mask_length == 5
    assert hubert_pretrain_base().mask_generator.mask_length == 10


def test_static_training_forward_with_its_draws_is_one_compiled_graph():
    """lightning.py off the CPU: masks and layer drops drawn beforehand, so --all-static --compile traces the
    training forward without a break (drawing inline: a break at the mask and at every layer's .item())."""
    model = hubert_pretrain_tiny(static_layerdrop=True, static_indexing=True, static_logit_generator=True)
    waveforms, labels, lengths = make_batch(100)
    torch._dynamo.reset()
    try:
        draws = model.draw(lengths.tolist())
        assert torch._dynamo.explain(model)(waveforms, labels, lengths, draws).graph_break_count == 0
        assert torch._dynamo.explain(model)(waveforms, labels, lengths).graph_break_count > 0
    finally:
        torch._dynamo.reset()
