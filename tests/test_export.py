"""export.py: a Lightning checkpoint -> torchaudio file and HF HubertModel folder, layer by layer equal to ours.

Padding, as found in transformers 5.x: HubertModel turns ``attention_mask`` (samples) into frame lengths
with the conv formula, zeroes the padded frames after the feature projection and masks them as keys,
which is what our model does with ``lengths`` -- so every frame agrees, padded ones included. Without
``attention_mask`` both treat the zeros as signal and agree too. What no mask fixes: a group-norm
extractor normalises over the whole padded waveform, so a padded clip's features differ from the same clip
alone (in our model, torchaudio's and HF's alike); a layer-norm extractor is per frame, so there they match.
``hidden_states`` of transformers 5.x are (input of layer 1, output of layer 1, ..., output of layer L)
before the final layer norm of a pre-LN encoder, the same as our ``extract_features`` after the first.
"""
import pytest
import torch
import torchaudio
from transformers import HubertConfig, HubertModel  # a test dependency (requirements-dev.txt)

import export
from model import hubert_pretrain_base, hubert_pretrain_model, hubert_pretrain_tiny
from tests.numerics import assert_same_math, float64_copies
from tests.test_model import SMALL

pytestmark = pytest.mark.numerics  # run again under ATEN_CPU_CAPABILITY=default by make test

PRE_LN = {**SMALL, "encoder_num_layers": 2}  # Large's layout: layer-norm extractor, pre-LN, conv bias
LENGTHS = torch.tensor([16000, 11000])


def build(arch: str, conv2d: bool, **overrides):
    """A model whose every parameter is random (an identity LayerNorm would hide a swapped mapping)."""
    flags = dict(use_conv2d=True, use_instancenorm=True) if conv2d else {}
    if arch == "tiny":  # group-norm extractor, pre-LN
        model = hubert_pretrain_tiny(**flags, **overrides)
    elif arch == "post_ln":  # Base's layout: group-norm extractor, post-LN
        model = hubert_pretrain_tiny(encoder_layer_norm_first=False, **flags, **overrides)
    else:
        model = hubert_pretrain_model(**{**PRE_LN, **overrides}, **flags)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_lightning(model, path):
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hubert_config": model.config, "global_step": 7}, path)
    return path


def padded_batch():
    torch.manual_seed(2)
    waveforms = torch.randn(2, 16000)
    waveforms[1, LENGTHS[1]:] = 0.0
    attention_mask = (torch.arange(16000) < LENGTHS[:, None]).long()
    return waveforms, attention_mask


def padded_batch64():
    waveforms, attention_mask = padded_batch()
    return waveforms.double(), attention_mask


def assert_layers_close(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_same_math(b, a, msg=f"layer {i + 1}")


@pytest.mark.parametrize("conv2d", [False, True], ids=["conv1d", "conv2d"])
@pytest.mark.parametrize("arch", ["tiny", "post_ln", "pre_ln"])
def test_exports_match_ours_in_every_layer(tmp_path, arch, conv2d, capsys):
    source = build(arch, conv2d)
    ckpt = save_lightning(source, tmp_path / "epoch=0-step=7.ckpt")
    export.main(["--checkpoint", str(ckpt), "--torchaudio", str(tmp_path / "ta.pt"),
                 "--hf-dir", str(tmp_path / "hf")])
    printed = capsys.readouterr().out
    assert "max |diff| vs ours" in printed and "hubert_pretraining_head.pt" in printed
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "hubert_pretraining_head.pt", "model.safetensors"]
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers

    obj = torch.load(tmp_path / "ta.pt", weights_only=True)
    ta_model = torchaudio.models.wav2vec2_model(**obj["config"]).eval()
    ta_model.load_state_dict(obj["state_dict"])  # strict
    hf_model, info = HubertModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    hf_model.eval()
    assert hf_model.config.do_stable_layer_norm == (arch != "post_ln")
    assert hf_model.config.feat_extract_norm == ("layer" if arch == "pre_ln" else "group")

    waveforms, attention_mask = padded_batch64()
    source64, ta64, hf64 = float64_copies(source, ta_model, hf_model)  # the exports are fp32 files
    with torch.no_grad():
        ours, frames = source64.wav2vec2.extract_features(waveforms, LENGTHS)
        ta_layers, ta_frames = ta64.extract_features(waveforms, LENGTHS)
        hf_out = hf64(waveforms, attention_mask=attention_mask, output_hidden_states=True)
        assert torch.equal(ta_frames, frames)
        assert_layers_close(ours, ta_layers)
        assert_layers_close(ours, hf_out.hidden_states[1:])
        assert_same_math(hf_out.last_hidden_state, source64.wav2vec2(waveforms, LENGTHS)[0])
        # No padding information at all: the zeros are signal for both.
        unmasked = hf64(waveforms, output_hidden_states=True).hidden_states[1:]
        assert_layers_close(source64.wav2vec2.extract_features(waveforms)[0], unmasked)
        # The padded clip against the same clip alone: equal only with a per-frame (layer-norm) extractor.
        alone = hf64(waveforms[1:, :LENGTHS[1]]).last_hidden_state[0]
        gap = (alone - hf_out.last_hidden_state[1, :frames[1]]).abs().max().item()
        assert gap < 1e-12 if arch == "pre_ln" else gap > 1e-2

    head = torch.load(tmp_path / "hf" / "hubert_pretraining_head.pt", weights_only=True)
    expected = {k: v for k, v in source.state_dict().items() if k.startswith("logit_generator.")}
    assert head.keys() == expected.keys()
    for k in expected:
        assert torch.equal(head[k], expected[k])
    assert torch.equal(hf_model.masked_spec_embed, source.mask_generator.mask_embedding)


ARCH_FIELDS = ("feat_extract_norm", "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "hidden_size",
               "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_conv_pos_embeddings",
               "num_conv_pos_embedding_groups", "do_stable_layer_norm", "layer_norm_eps", "hidden_act")


def arch_fields(config):
    return {f: list(v) if isinstance(v, (list, tuple)) else v for f in ARCH_FIELDS for v in [getattr(config, f)]}


def test_base_export_loads_into_torchaudio_hubert_base_and_has_hf_base_config():
    model = hubert_pretrain_base()
    torchaudio.models.hubert_base().load_state_dict(export.encoder_state_dict(model))  # strict
    # HubertConfig's defaults are the facebook/hubert-base-ls960 architecture.
    assert arch_fields(export.hf_config(model)) == arch_fields(HubertConfig())


def test_existing_outputs_are_kept_unless_overwrite(tmp_path):
    # No masking: HubertModel then has no masked_spec_embed, so the mask embedding goes to the head file.
    source = build("pre_ln", conv2d=False, mask_prob=0.0)
    ckpt = save_lightning(source, tmp_path / "model.ckpt")
    out, ta = tmp_path / "hf", tmp_path / "ta.pt"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier export's file
    (out / "model-00001-of-00002.safetensors").write_text("old shard")
    ta.write_bytes(b"old")
    for flag, path in (("--hf-dir", out), ("--torchaudio", ta)):
        with pytest.raises(SystemExit, match=f"{path} already exists; pass --overwrite"):
            export.main(["--checkpoint", str(ckpt), flag, str(path)])
    assert (out / "config.json").read_text() == "{}" and ta.read_bytes() == b"old"

    export.main(["--checkpoint", str(ckpt), "--hf-dir", str(out), "--torchaudio", str(ta), "--overwrite"])
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert torch.load(ta, weights_only=True)["config"]["encoder_num_layers"] == 2
    head = torch.load(out / "hubert_pretraining_head.pt", weights_only=True)
    assert torch.equal(head["mask_generator.mask_embedding"], source.mask_generator.mask_embedding)
    assert not hasattr(HubertModel.from_pretrained(out), "masked_spec_embed")
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("other", ["file", "folder", "link", "hf_dir_is_a_file"])
def test_overwrite_refuses_an_hf_dir_holding_anything_export_did_not_write(tmp_path, other):
    """--hf-dir DIR --overwrite used to delete the whole of DIR: now a folder holding a checkpoint, a subfolder
    or a link, or a DIR that is a file, is refused by name and nothing is written or deleted."""
    ckpt = save_lightning(build("pre_ln", conv2d=False), tmp_path / "model.ckpt")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    precious = {"file": out / "last.ckpt", "folder": out / "runs" / "notes.txt", "link": tmp_path / "target.txt",
                "hf_dir_is_a_file": tmp_path / "file"}[other]
    precious.parent.mkdir(exist_ok=True)
    precious.write_text("precious")
    if other == "link":
        (out / "model.safetensors").symlink_to(precious)
    if other == "hf_dir_is_a_file":
        out = precious
    before = sorted(map(str, tmp_path.rglob("*")))

    message = "is not a folder" if other == "hf_dir_is_a_file" else "holds 1 file\\(s\\) that export.py does not write"
    with pytest.raises(SystemExit, match=f"--hf-dir {out} (exists and )?{message}"):
        export.main(["--checkpoint", str(ckpt), "--hf-dir", str(out), "--torchaudio", str(tmp_path / "ta.pt"),
                     "--overwrite"])
    assert sorted(map(str, tmp_path.rglob("*"))) == before and precious.read_text() == "precious"


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(SystemExit, match="nope.ckpt does not exist"):
        export.main(["--checkpoint", str(tmp_path / "nope.ckpt"), "--torchaudio", str(tmp_path / "ta.pt")])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"model.weight": torch.zeros(3)}}, foreign)
    with pytest.raises(SystemExit, match="foreign.pt does not hold a HuBERT pre-training model"):
        export.main(["--checkpoint", str(foreign), "--hf-dir", str(tmp_path / "hf")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.pt"]
    with pytest.raises(SystemExit):  # argparse: nothing to export
        export.main(["--checkpoint", str(foreign)])


def test_check_refuses_differences_above_tolerance():
    ours = torch.zeros(1, 5, 4)
    assert export.max_difference("x", ours, ours + 5e-5) == pytest.approx(5e-5)
    with pytest.raises(ValueError, match="differ by 0.0002 from ours"):
        export.max_difference("x", ours, ours + 2e-4)
    with pytest.raises(ValueError, match="differ by nan"):
        export.max_difference("x", ours, ours * float("nan"))
    with pytest.raises(ValueError, match="shape"):
        export.max_difference("x", ours, ours[:, :4])


@pytest.mark.parametrize("use_conv2d", [False, True], ids=["conv1d", "conv2d"])
def test_finetuned_export_is_a_hubert_for_ctc_with_its_processor(tmp_path, use_conv2d):
    """A finetune.py checkpoint -> HubertForCTC + Wav2Vec2Processor (offline from_pretrained) and a torchaudio
    wav2vec2_model with aux: the same logits as ours, and HF's own decoding gives our greedy transcript."""
    from transformers import HubertForCTC, Wav2Vec2Processor

    from tests.fixtures import save_finetuned_checkpoint
    from utils.checkpoint import load_finetuned_model
    from utils.ctc import VOCAB, greedy_decode

    ckpt = save_finetuned_checkpoint(tmp_path / "ft.ckpt", use_conv2d=use_conv2d)
    export.main(["--checkpoint", str(ckpt), "--torchaudio", str(tmp_path / "ta.pt"), "--hf-dir", str(tmp_path / "hf")])
    assert {"vocab.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}
    ours, vocab = load_finetuned_model(ckpt)
    ours.eval()
    hf_model, info = HubertForCTC.from_pretrained(tmp_path / "hf", output_loading_info=True, local_files_only=True)
    assert not any(info.values()), info
    processor = Wav2Vec2Processor.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert hf_model.config.vocab_size == len(vocab) == 29 and hf_model.config.pad_token_id == 0
    obj = torch.load(tmp_path / "ta.pt", weights_only=True)
    assert obj["labels"] == list(VOCAB) and obj["config"]["aux_num_out"] == 29
    ta_model = torchaudio.models.wav2vec2_model(**obj["config"]).eval()
    ta_model.load_state_dict(obj["state_dict"])  # strict: aux included

    waveforms, attention_mask = padded_batch()
    inputs = processor([w[:n].numpy() for w, n in zip(waveforms, LENGTHS)], sampling_rate=16000,
                       return_tensors="pt", padding=True)
    assert torch.equal(inputs.input_values, waveforms) and torch.equal(inputs.attention_mask, attention_mask)
    ours, hf_model, ta_model = float64_copies(ours, hf_model, ta_model)
    waveforms = waveforms.double()
    with torch.no_grad():
        logits, frames = ours(waveforms, LENGTHS)
        hf_logits = hf_model(input_values=waveforms, attention_mask=inputs.attention_mask).logits
        assert_same_math(hf_logits, logits)
        assert_same_math(ta_model(waveforms, LENGTHS)[0], logits)
    ids = hf_logits.argmax(-1)
    for i in range(len(ids)):  # HF's tokenizer merges repeats, drops the pad (blank) and reads | as a space
        text = processor.decode(ids[i, :frames[i]])
        assert text == greedy_decode(logits[i], int(frames[i])) and len(text) > 5


def test_a_phone_model_exports_with_a_tokenizer_that_spaces_its_tokens(tmp_path):
    """A token (phone) vocabulary: HF's phoneme tokenizer, without a phonemizer, decodes as our greedy search."""
    from transformers import HubertForCTC, Wav2Vec2Processor

    from tests.fixtures import save_finetuned_checkpoint
    from utils.checkpoint import load_finetuned_model
    from utils.ctc import greedy_decode

    phones = ("-", "AA", "B", "SH", "IY", "T")
    ckpt = save_finetuned_checkpoint(tmp_path / "ft.ckpt", vocab=phones)
    export.main(["--checkpoint", str(ckpt), "--hf-dir", str(tmp_path / "hf")])
    ours, vocab = load_finetuned_model(ckpt)
    processor = Wav2Vec2Processor.from_pretrained(tmp_path / "hf", local_files_only=True)
    hf_model = HubertForCTC.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert vocab == phones and hf_model.config.vocab_size == 6
    waveforms, _ = padded_batch()
    with torch.no_grad():
        logits, frames = ours.eval()(waveforms[:1, :LENGTHS[0]])
        ids = hf_model(waveforms[:1, :LENGTHS[0]]).logits.argmax(-1)[0]
    text = processor.decode(ids)
    assert text == greedy_decode(logits[0], vocab=vocab) and " " in text and set(text.split()) <= set(phones[1:])
    assert processor.tokenizer("AA SH T").input_ids == [1, 3, 5]
