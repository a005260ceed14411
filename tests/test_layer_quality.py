"""tools/layer_quality.py: k-means on each layer of a checkpoint, scored on the demo's held-out alignments."""
import json
from pathlib import Path

import pytest
import torch

from model import hubert_pretrain_tiny
from tests.numerics import assert_fp32_close
from tools.layer_quality import layer_features, main
from utils.checkpoint import load_pretrained_model
from utils.feature_utils import load_audio

DEMO = Path(__file__).resolve().parents[1] / "demo_data"
DEV = DEMO / "LibriSpeech" / "dev-clean"
ALIGNMENTS = DEMO / "alignments" / "dev-clean.tsv"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised tiny model saved as train.py saves it, and a file list of 4 training files."""
    torch.manual_seed(0)
    model = hubert_pretrain_tiny(use_conv2d=True, use_instancenorm=True)
    root = tmp_path_factory.mktemp("layers")
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hubert_config": model.config}, root / "last.ckpt")
    train = sorted((DEMO / "LibriSpeech" / "train-clean-100").rglob("*.flac"))[:4]
    (root / "train.tsv").write_text("/\n" + "".join(f"{str(f)[1:]}\t0\n" for f in train))
    return root


def test_every_layer_and_their_concatenation_are_scored(checkpoint, capsys):
    results = main(["--checkpoint", str(checkpoint / "last.ckpt"), "--tsv", str(checkpoint / "train.tsv"),
                    "--audio-dir", str(DEV), "--alignments", str(ALIGNMENTS), "--num-cluster", "8", "--concat",
                    "--json"])
    assert [r["layer"] for r in results] == [1, 2, 3, 4, 5, 6, "all"]
    assert [r["dims"] for r in results] == [256] * 6 + [6 * 256]
    assert all(0 < r["pnmi"] < 1 for r in results)
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == results


def test_the_transformer_input_is_layer_zero(checkpoint):
    """Layer 0 is what the first layer reads: the CNN's features, projected, plus the positional conv."""
    model = load_pretrained_model(checkpoint / "last.ckpt").eval()
    files = [next(DEV.rglob("*.flac"))]
    (given,), (first,), *_ = layer_features(model, files, with_input=True)
    encoder = model.wav2vec2.encoder
    with torch.inference_mode():
        features, _ = model.wav2vec2.feature_extractor(load_audio(files[0])[None], None)
        expected = encoder.transformer._preprocess(encoder.feature_projection(features))[0]
    torch.testing.assert_close(given, expected)
    with torch.inference_mode():  # the same as the model's layer 0 (preprocess.py --layer-index 0)
        (layer0,), _ = model.wav2vec2.extract_features(load_audio(files[0])[None], num_layers=0)
    torch.testing.assert_close(given, layer0[0])
    assert torch.equal(first, layer_features(model, files)[0][0]) and not torch.allclose(first, given)
    results = main(["--checkpoint", str(checkpoint / "last.ckpt"), "--tsv", str(checkpoint / "train.tsv"),
                    "--audio-dir", str(DEV), "--alignments", str(ALIGNMENTS), "--num-cluster", "8", "--input"])
    assert [r["layer"] for r in results] == [0, 1, 2, 3, 4, 5, 6]


def test_layer_norm_normalises_each_frame(checkpoint):
    model = load_pretrained_model(checkpoint / "last.ckpt").eval()
    (frames,) = layer_features(model, [next(DEV.rglob("*.flac"))], layer_norm=True)[-1]
    # fp32 statistics of unit-scale frames: rounding is relative to that scale, 1.
    assert_fp32_close(frames.mean(-1), torch.zeros(len(frames)), ulps=1024, scale=1.0)
    assert_fp32_close(frames.std(-1, unbiased=False), torch.ones(len(frames)), ulps=1024, scale=1.0)
