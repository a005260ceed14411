"""Feature shard files: streamed .npy shards read back, upstream's torch .pt shards read, and inconsistent or
truncated shards named."""
import numpy as np
import pytest
import torch

from tests.test_kmeans import write_upstream_shard
from utils.feature_shards import ShardReader, load_shard, shard_is_done, shard_paths, write_shard


def utterances(lengths, dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=generator) for n in lengths]


def test_streamed_shard_reads_back_and_is_a_plain_npy(tmp_path):
    lengths = [3, 0, 7, 2]
    feats = utterances(lengths)
    write_shard(tmp_path, "train", 2, 3, iter(feats), lengths, 5, key="abc")
    feat, lens, done = shard_paths(tmp_path, "train", 2, 3)
    assert [feat.name, lens.name, done.name] == ["train_2_3.npy", "len_train_2_3.pt", "train_2_3.done"]
    assert shard_is_done(tmp_path, "train", 2, 3, "abc") and not shard_is_done(tmp_path, "train", 2, 3, "abd")
    assert np.array_equal(np.load(feat), torch.cat(feats).numpy())
    lens_tensor = torch.load(lens, weights_only=True)
    assert lens_tensor.dtype == torch.float32 and lens_tensor.tolist() == lengths  # upstream's length file
    with ShardReader(tmp_path, "train", 2, 3) as reader:
        assert (reader.rows, reader.dim, reader.lengths.tolist()) == (12, 5, lengths)
        for expected in feats:
            assert torch.equal(reader.read(len(expected)), expected)
        with pytest.raises(ValueError, match="asked for rows up to 13, it has 12"):
            reader.read(1)
    all_feats, int_lengths = load_shard(tmp_path, "train", 2, 3)
    assert torch.equal(all_feats, torch.cat(feats)) and int_lengths.dtype == torch.int64
    # An empty shard (fewer utterances than shards) is a valid (0, D) file.
    write_shard(tmp_path, "valid", 1, 1, iter([]), [], 5, key="empty")
    assert load_shard(tmp_path, "valid", 1, 1)[0].shape == (0, 5)


def test_upstream_pt_shard_is_read(tmp_path):
    lengths = [4, 1, 6]
    feats = utterances(lengths, dim=39)
    write_upstream_shard(tmp_path, "train", 1, 2, torch.cat(feats), lengths)
    all_feats, int_lengths = load_shard(tmp_path, "train", 1, 2)
    assert torch.equal(all_feats, torch.cat(feats)) and int_lengths.tolist() == lengths
    with ShardReader(tmp_path, "train", 1, 2) as reader:
        assert reader.path.name == "train_1_2.pt"
        out = np.empty((5, 39), dtype=np.float32)
        reader.read(5, out=out)
        assert np.array_equal(out, torch.cat(feats)[:5].numpy())


def test_bad_utterance_or_count_leaves_no_shard(tmp_path):
    with pytest.raises(ValueError, match=r"train_1_1.npy: utterance 2 has features of shape \(4, 5\), expected \(3"):
        write_shard(tmp_path, "train", 1, 1, iter(utterances([2, 4])), [2, 3], 5, key="k")
    with pytest.raises(ValueError, match="got 1 utterances' features, expected 2"):
        write_shard(tmp_path, "train", 1, 1, iter(utterances([2])), [2, 3], 5, key="k")
    with pytest.raises(ValueError, match="utterance 2 has features of shape .* expected nothing"):
        write_shard(tmp_path, "train", 1, 1, iter(utterances([2, 3])), [2], 5, key="k")
    assert list(tmp_path.iterdir()) == []


def test_inconsistent_missing_or_truncated_shards_name_their_file(tmp_path):
    write_upstream_shard(tmp_path, "train", 1, 1, torch.zeros(5, 3), [2, 2])
    with pytest.raises(ValueError, match=r"train_1_1.pt has shape \(5, 3\) .* but .*len_train_1_1.pt sums to 4"):
        ShardReader(tmp_path, "train", 1, 1)
    with pytest.raises(FileNotFoundError, match="train_1_2.npy is missing"):
        ShardReader(tmp_path, "train", 1, 2)
    write_shard(tmp_path, "valid", 1, 1, iter(utterances([30])), [30], 5, key="k")
    feat = shard_paths(tmp_path, "valid", 1, 1)[0]
    feat.write_bytes(feat.read_bytes()[:-7])
    with pytest.raises(ValueError, match="valid_1_1.npy is shorter than its header says"):
        load_shard(tmp_path, "valid", 1, 1)
