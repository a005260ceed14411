"""k-means fit and labels: the --percent sample, nearest-centre labels in chunks, shard checks, skip of a
finished fit, and joining the per-shard label files."""
import joblib
import pytest
import torch

from utils.common_utils import atomic_write
from utils.feature_utils import shard_paths
from utils.kmeans import (dump_label_shard, fit_kmeans, learn_kmeans, load_centers, load_feature,
                          merge_label_shards, predict)


def write_shard(feat_dir, split, rank, num_rank, feats, lengths):
    feat, lens, done = shard_paths(feat_dir, split, rank, num_rank)
    feat_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(feat) as f:
        torch.save(feats, f)
    with atomic_write(lens) as f:
        torch.save(torch.tensor(lengths, dtype=torch.float32), f)
    done.write_text(f"key {rank}")


def utterance_shards(feat_dir, sizes):
    """Shards whose utterance u (numbered across shards) has rows filled with the value u."""
    u = 0
    for rank, lengths in enumerate(sizes, start=1):
        rows = []
        for n in lengths:
            rows.append(torch.full((n, 3), float(u)))
            u += 1
        write_shard(feat_dir, "train", rank, len(sizes), torch.cat(rows), lengths)


def test_percent_samples_sorted_utterances_per_shard_with_the_seed(tmp_path):
    sizes = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [5, 8, 9, 7, 9, 3, 2, 3, 8, 4]]
    utterance_shards(tmp_path, sizes)
    everything = load_feature(tmp_path, "train", 2, -1, seed=0)
    assert everything.shape == (sum(map(sum, sizes)), 3) and everything.dtype == torch.float32
    sample = load_feature(tmp_path, "train", 2, 0.3, seed=7)
    generator = torch.Generator().manual_seed(7)
    expected = []
    for first, lengths in ((0, sizes[0]), (10, sizes[1])):
        picks = torch.randperm(10, generator=generator)[:3].sort().values.tolist()
        expected += [float(first + p) for p in picks for _ in range(lengths[p])]
    assert sample[:, 0].tolist() == expected
    assert torch.equal(load_feature(tmp_path, "train", 2, 0.3, seed=7), sample)


def test_inconsistent_shard_names_its_file(tmp_path):
    write_shard(tmp_path, "train", 1, 1, torch.zeros(5, 3), [2, 2])
    with pytest.raises(ValueError, match=r"train_1_1.pt has shape \(5, 3\) but .*len_train_1_1.pt sums to 4"):
        load_feature(tmp_path, "train", 1, -1, 0)
    with pytest.raises(FileNotFoundError, match="train_1_2.pt is missing"):
        load_feature(tmp_path, "train", 2, -1, 0)


def test_predict_is_nearest_centre_in_chunks():
    generator = torch.Generator().manual_seed(0)
    feats, centers = torch.randn(103, 5, generator=generator), torch.randn(6, 5, generator=generator)
    expected = torch.cdist(feats.double(), centers.double()).argmin(1)
    assert torch.equal(predict(feats, centers, chunk_frames=7), expected)
    assert torch.equal(predict(feats, centers), expected)


def test_fit_is_seeded_saved_and_not_redone(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0], [5, 5], [0, 5]])
    blobs = torch.cat([torch.randn(40, 2, generator=generator) * 0.1 + c for c in centres])
    write_shard(tmp_path / "feat", "train", 1, 1, blobs, [60, 60])
    inertia = learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 3, seed=0)
    km = joblib.load(tmp_path / "km" / "model.pt")
    assert km.cluster_centers_.shape == (3, 2) and km.random_state == 0 and km.n_init == 20
    assert sorted(map(tuple, km.cluster_centers_.round().tolist())) == [(0, 0), (0, 5), (5, 5)]
    assert inertia == pytest.approx(0.02, rel=0.5)  # 2 dims x 0.1^2 variance
    assert (fit_kmeans(blobs.numpy(), 3, 0).cluster_centers_ == km.cluster_centers_).all()
    stamp = (tmp_path / "km" / "model.pt").stat().st_mtime_ns
    assert learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 3, seed=0) == inertia
    assert (tmp_path / "km" / "model.pt").stat().st_mtime_ns == stamp
    learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 2, seed=0)  # another K: refitted
    assert joblib.load(tmp_path / "km" / "model.pt").cluster_centers_.shape == (2, 2)
    with pytest.raises(ValueError, match="needs at least 500 frames"):
        learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 500, seed=0)


def test_label_shards_are_joined_in_order(tmp_path):
    centers = torch.tensor([[0.0, 0, 0], [10, 10, 10]])
    write_shard(tmp_path / "feat", "valid", 1, 2, torch.tensor([[0.0, 0, 1], [9, 9, 9], [1, 0, 0]]), [2, 1])
    write_shard(tmp_path / "feat", "valid", 2, 2, torch.zeros(0, 3), [])
    for rank in (2, 1):
        dump_label_shard(tmp_path / "feat", centers, tmp_path / "label", "valid", rank, 2)
    path = merge_label_shards(tmp_path / "label", "valid", 2)
    assert path.name == "label_valid.pt" and path.read_text() == "0 1\n0\n"
    assert [p.name for p in (tmp_path / "label").iterdir()] == ["label_valid.pt"]
    with pytest.raises(FileNotFoundError, match="model.pt not found"):
        load_centers(tmp_path / "nokm", "cpu")
