"""Checkpoint files: Lightning-style and plain, conv2d and conv1d, and clear errors for bad files."""
import pytest
import torch

from model import hubert_pretrain_model, hubert_pretrain_tiny
from tests.numerics import assert_same_math, float64_copies
from tests.test_model import SMALL
from utils.checkpoint import load_checkpoint, load_pretrained_model

pytestmark = pytest.mark.numerics  # run again under ATEN_CPU_CAPABILITY=default by make test


def features(model, waveforms):
    model.eval()
    with torch.no_grad():
        return model.wav2vec2.extract_features(waveforms, num_layers=2)[0][-1]


def float64_features(model, waveforms):
    (model64,) = float64_copies(model)
    return features(model64, waveforms.double())


def test_lightning_checkpoint_with_config_in_conv2d_layout(tmp_path):
    source = hubert_pretrain_model(**SMALL, use_conv2d=True, use_instancenorm=True)
    path = tmp_path / "epoch=0-step=1.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
                "hubert_config": source.config, "global_step": 1}, path)
    model = load_pretrained_model(path, use_conv2d=False, use_instancenorm=False)
    assert model.wav2vec2.feature_extractor.conv_layers[0].conv.weight.ndim == 3
    waveforms = torch.randn(1, 8000)
    assert_same_math(float64_features(model, waveforms), float64_features(source, waveforms))


def test_plain_state_dict_infers_architecture(tmp_path):
    source = hubert_pretrain_tiny(num_classes=12)
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    model = load_pretrained_model(path)
    assert model.logit_generator.label_embeddings.shape == (12, 128)


def test_missing_truncated_and_foreign_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint(tmp_path / "nope.ckpt")
    good = tmp_path / "good.pt"
    torch.save(hubert_pretrain_tiny().state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pt is truncated or not a PyTorch checkpoint"):
        load_checkpoint(truncated)
    # 4 KiB overwritten inside the tensors: torch.load alone returns damaged weights without a word.
    data = bytearray(good.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(data))
    assert isinstance(torch.load(corrupt, weights_only=True), dict)
    with pytest.raises(ValueError, match=r"corrupt.pt is corrupt: .*data/\d+ does not match its CRC-32"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt does not hold a HuBERT pre-training model"):
        load_pretrained_model(foreign)


def test_a_checkpoint_holding_code_is_refused_and_the_code_never_runs(tmp_path):
    """weights_only=True: a pickle that would write a marker file if loaded is refused by name."""
    from tests.test_kmeans import WritesMarker

    marker = tmp_path / "code_ran"
    torch.save({"state_dict": {}, "extra": WritesMarker(marker)}, tmp_path / "crafted.ckpt")
    with pytest.raises(ValueError, match="crafted.ckpt is truncated or not a PyTorch checkpoint: .*Weights only"):
        load_checkpoint(tmp_path / "crafted.ckpt")
    assert not marker.exists()
