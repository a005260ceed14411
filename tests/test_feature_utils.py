"""Feature extraction and shard dumping: shard ranges, audio loading, MFCC against torchaudio, HuBERT layer
features from a checkpoint and their frame counts, skip/recompute of finished shards, the k-means sample only,
and features read back or extracted."""
import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from model import hubert_pretrain_tiny
from tests.numerics import assert_fp32_close
from tests.test_common_utils import tone
from utils.feature_shards import load_shard, shard_paths
from utils.feature_utils import (dump_features, hubert_extractor, load_audio, mfcc_extractor, read_shards,
                                 shard_features, shard_range)


def save_checkpoint(path, **flags):
    """A checkpoint as train.py writes it (Lightning ``model.`` keys plus the model config)."""
    model = hubert_pretrain_tiny(**flags)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hubert_config": model.config}, path)
    return model


def test_shard_ranges_round_half_even():
    # n / R = 2.5: round(2.5) = 2 and round(7.5) = 8 (half to even), as upstream.
    assert [shard_range(10, r, 4) for r in range(1, 5)] == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert [shard_range(3, r, 5) for r in range(1, 6)] == [(0, 1), (1, 1), (1, 2), (2, 2), (2, 3)]
    for n in range(1, 30):
        for num_rank in range(1, 8):
            ranges = [shard_range(n, r, num_rank) for r in range(1, num_rank + 1)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError, match="rank must be in"):
        shard_range(10, 0, 4)
    with pytest.raises(ValueError, match="empty"):
        shard_range(0, 1, 4)


def test_load_audio_matches_torchaudio_scaling_and_names_bad_files(tmp_path):
    ints = np.array([[0, 5], [-32768, 7], [32767, -1], [123, 0]] * 200, dtype=np.int16)
    soundfile.write(tmp_path / "stereo.flac", ints, 16000, subtype="PCM_16")
    waveform = load_audio(tmp_path / "stereo.flac")
    assert waveform.dtype == torch.float32 and waveform.shape == (800,)
    assert torch.equal(waveform, torch.from_numpy(ints[:, 0].astype(np.float32) / 32768))
    with pytest.raises(ValueError, match="stereo.flac: has 800 samples but the TSV says 801"):
        load_audio(tmp_path / "stereo.flac", 801)
    soundfile.write(tmp_path / "full.flac", tone(32000, 200, 0), 16000, subtype="PCM_16")
    data = (tmp_path / "full.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])  # header intact, frames missing
    with pytest.raises(ValueError, match="cut.flac"):
        load_audio(tmp_path / "cut.flac", 32000)
    soundfile.write(tmp_path / "rate.flac", tone(8000, 200, 0), 8000)
    with pytest.raises(ValueError, match="rate.flac: sample rate 8000 Hz"):
        load_audio(tmp_path / "rate.flac")


@pytest.mark.filterwarnings("ignore:At least one mel filterbank has all zero values")
def test_mfcc_equals_torchaudio_and_has_100hz_frames():
    extractor = mfcc_extractor()
    for num_samples in (400, 559, 560, 17123):
        waveform = torch.from_numpy(tone(num_samples, 220, num_samples).astype(np.float32))
        feature = extractor.extract(waveform)
        assert feature.shape == ((num_samples - 400) // 160 + 1, 39) and feature.dtype == torch.float32
        mfcc = torchaudio.transforms.MFCC(sample_rate=16000, n_mfcc=13,
                                          melkwargs={"n_fft": 400, "hop_length": 160, "center": False})(waveform)
        deltas = torchaudio.functional.compute_deltas(mfcc)
        expected = torch.cat([mfcc, deltas, torchaudio.functional.compute_deltas(deltas)]).T
        assert torch.equal(feature, expected)
        assert extractor.frames(num_samples) == len(feature)
    assert extractor.dim == 39


@pytest.mark.numerics
def test_hubert_layer_features_in_eval_mode_from_a_conv2d_checkpoint(tmp_path):
    model = save_checkpoint(tmp_path / "conv2d.ckpt", use_conv2d=True)
    extractor = hubert_extractor(tmp_path / "conv2d.ckpt", 3, "cpu")
    waveform = torch.from_numpy(tone(12345, 220, 0).astype(np.float32))
    feature = extractor.extract(waveform)
    assert feature.shape == ((12345 - 400) // 320 + 1, 256) and extractor.dim == 256
    model.eval()  # dropout off: the features are the layer output, the same on every call
    with torch.no_grad():
        expected = model.wav2vec2.extract_features(waveform[None], num_layers=3)[0][-1][0]
    assert_fp32_close(feature, expected)  # the extractor's fp32 run against the model alone
    assert torch.equal(extractor.extract(waveform), feature)
    for num_samples in (400, 719, 720, 1039, 1040, 12345):  # frame counts known before extraction
        assert extractor.frames(num_samples) == len(extractor.extract(waveform[:num_samples]))
    with pytest.raises(ValueError, match="--layer-index 7 is out of range: .*conv2d.ckpt has 6"):
        hubert_extractor(tmp_path / "conv2d.ckpt", 7, "cpu")
    with pytest.raises(ValueError, match="--layer-index -1 is out of range"):
        hubert_extractor(tmp_path / "conv2d.ckpt", -1, "cpu")
    transformer_input = hubert_extractor(tmp_path / "conv2d.ckpt", 0, "cpu")  # --layer-index 0
    with torch.no_grad():
        expected = model.wav2vec2.extract_features(waveform[None], num_layers=0)[0][0][0]
    assert_fp32_close(transformer_input.extract(waveform), expected)
    assert not torch.allclose(expected, feature) and "layer 0" in transformer_input.description


def audio_list(tmp_path, lengths):
    root = tmp_path / "audio"
    root.mkdir()
    for i, n in enumerate(lengths):
        soundfile.write(root / f"{i}.flac", tone(n, 200 + 30 * i, i), 16000, subtype="PCM_16")
    tsv = tmp_path / "list.tsv"
    tsv.write_text(f"{root}\n" + "".join(f"{i}.flac\t{n}\n" for i, n in enumerate(lengths)))
    return tsv


def test_dump_skips_finished_shards_and_redoes_changed_ones(tmp_path):
    lengths = [4000, 5000, 6001]
    tsv = audio_list(tmp_path, lengths)
    feat_dir, extractor = tmp_path / "feat", mfcc_extractor()
    shards = read_shards(tsv, "train", 2)
    assert [len(shard.lines) for shard in shards] == [2, 1]  # round(1.5) = 2
    assert [dump_features(shard, feat_dir, extractor) for shard in shards] == [True, True]
    feat, lens, done = shard_paths(feat_dir, "train", 1, 2)
    assert torch.load(lens).tolist() == [(n - 400) // 160 + 1 for n in lengths[:2]]
    feats, int_lens = load_shard(feat_dir, "train", 1, 2)
    assert feats.shape == (sum(int_lens), 39) and np.load(feat).shape == feats.shape
    expected = [extractor.extract(load_audio(tmp_path / f"audio/{i}.flac")) for i in (0, 1)]
    assert torch.equal(feats, torch.cat(expected))
    feat, lens, done = shard_paths(feat_dir, "train", 2, 2)
    assert not dump_features(shards[1], feat_dir, extractor)
    feat.unlink()  # an incomplete shard is redone
    assert dump_features(shards[1], feat_dir, extractor)
    reordered = "".join(f"{i}.flac\t{n}\n" for i, n in reversed(list(enumerate(lengths))))
    tsv.write_text(f"{tmp_path / 'audio'}\n{reordered}")
    shards = read_shards(tsv, "train", 2)
    assert dump_features(shards[1], feat_dir, extractor)  # same file names, other TSV content
    assert torch.load(lens).tolist() == [(lengths[0] - 400) // 160 + 1]


def test_a_sample_shard_holds_only_its_utterances_and_the_rest_is_extracted(tmp_path):
    lengths = [4000, 5000, 6001, 7002]
    tsv = audio_list(tmp_path, lengths)
    feat_dir, extractor = tmp_path / "feat", mfcc_extractor()
    shard, = read_shards(tsv, "train", 1)
    every = [extractor.extract(shard.waveform(i)) for i in range(4)]
    assert dump_features(shard, feat_dir, extractor, keep=[1, 3])
    feats, int_lens = load_shard(feat_dir, "train", 1, 1)
    assert int_lens.tolist() == [len(every[1]), len(every[3])] and torch.equal(feats, torch.cat([every[1], every[3]]))
    assert dump_features(shard, feat_dir, extractor, keep=[0, 3])  # another sample: redone
    assert not dump_features(shard, feat_dir, extractor, keep=[0, 3])

    extracted = []
    extract = extractor.extract
    extractor.extract = lambda waveform: extracted.append(len(waveform)) or extract(waveform)
    for a, b in zip(shard_features(shard, extractor, feat_dir, keep=[0, 3]), every, strict=True):
        assert torch.equal(a, b)
    assert extracted == lengths[1:3]  # utterances 0 and 3 were read back
    extracted.clear()
    assert all(torch.equal(a, b) for a, b in zip(shard_features(shard, extractor, feat_dir, keep=[1, 2]), every))
    assert extracted == lengths  # the stored shard holds another sample: everything is extracted
