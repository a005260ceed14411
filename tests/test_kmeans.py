"""k-means: the --percent picks, the sample gathered once (the same rows as the old gather), nearest-centre
labels in chunks, and skip of a finished fit."""
import joblib
import numpy as np
import pytest
import torch

from utils.common_utils import atomic_write
from utils.feature_shards import shard_paths, write_shard
from utils.kmeans import fit_kmeans, gather_sample, kmeans_picks, learn_kmeans, predict


def write_upstream_shard(feat_dir, split, rank, num_rank, feats, lengths, key=None):
    """A shard exactly as upstream's preprocess.py writes it (torch.save of the (sum T, D) tensor and of
    torch.Tensor(lengths)), plus our done marker."""
    feat, lens, done = shard_paths(feat_dir, split, rank, num_rank)
    feat_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(feat.with_suffix(".pt")) as f:
        torch.save(feats, f)
    with atomic_write(lens) as f:
        torch.save(torch.Tensor(lengths), f)
    done.write_text(key or f"key {rank}")


def old_gather(feat_dir, split, num_rank, percent, seed):
    """The k-means input as preprocess.py gathered it before the sample was held once (load_feature): whole
    shards, the sampled utterances' rows picked with index_select, and everything torch.cat-ed."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for rank in range(1, num_rank + 1):
        feat, lens, _ = shard_paths(feat_dir, split, rank, num_rank)
        feats = torch.load(feat.with_suffix(".pt"), mmap=True, weights_only=True)
        lengths = torch.load(lens, weights_only=True).long()
        if percent < 0:
            parts.append(feats)
            continue
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        picks = torch.randperm(len(lengths), generator=generator)[:int(len(lengths) * percent)].sort().values
        rows = [torch.arange(offsets[i], offsets[i + 1]) for i in picks.tolist()]
        parts.append(feats.index_select(0, torch.cat(rows)) if rows else feats[:0])
    return torch.cat(parts)


SIZES = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [5, 8, 9, 7, 9, 3, 2, 3, 8, 4], [], [7]]


def full_shards(feat_dir):
    """Upstream shards whose utterance u (numbered across shards) is (n_u, 3) features of value u + noise."""
    generator, u, utterances = torch.Generator().manual_seed(0), 0, []
    for rank, lengths in enumerate(SIZES, start=1):
        rows = []
        for n in lengths:
            rows.append(torch.full((n, 3), float(u)) + 0.1 * torch.randn(n, 3, generator=generator))
            u += 1
        utterances.append(rows)
        write_upstream_shard(feat_dir, "train", rank, len(SIZES), torch.cat(rows) if rows else torch.zeros(0, 3),
                             lengths)
    return utterances


@pytest.mark.parametrize("percent, seed", [(-1, 0), (0.3, 7), (0.5, 0), (1.0, 3)])
def test_the_sample_is_the_old_gather_held_once_and_fits_the_same_centres(tmp_path, percent, seed):
    utterances = full_shards(tmp_path / "old")
    expected = old_gather(tmp_path / "old", "train", len(SIZES), percent, seed).numpy()
    # What dump_features stores with these picks: the sampled utterances only, in order.
    picks = kmeans_picks([len(lengths) for lengths in SIZES], percent, seed)
    for rank, (rows, keep) in enumerate(zip(utterances, picks), start=1):
        keep = range(len(rows)) if keep is None else keep
        write_shard(tmp_path / "new", "train", rank, len(SIZES), (rows[i] for i in keep),
                    [len(rows[i]) for i in keep], 3, key="k")
    sample = gather_sample(tmp_path / "new", "train", len(SIZES))
    assert sample.dtype == np.float32 and sample.flags.c_contiguous and sample.flags.owndata
    assert np.array_equal(sample, expected)
    assert np.array_equal(fit_kmeans(sample, 3, seed).cluster_centers_, fit_kmeans(expected, 3, seed).cluster_centers_)
    # Upstream's shards are read too: a whole-shard sample gathers to the same rows.
    if percent < 0:
        assert np.array_equal(gather_sample(tmp_path / "old", "train", len(SIZES)), expected)


def test_picks_are_the_seeded_per_shard_draws():
    picks = kmeans_picks([10, 0, 7], 0.3, seed=5)
    generator = torch.Generator().manual_seed(5)
    assert picks == [torch.randperm(n, generator=generator)[:int(n * 0.3)].sort().values.tolist() for n in (10, 0, 7)]
    assert [len(p) for p in picks] == [3, 0, 2] and all(p == sorted(p) for p in picks)
    assert kmeans_picks([10, 0, 7], -1, seed=5) == [None, None, None]
    assert kmeans_picks([10, 0, 7], 0.3, seed=5) == picks and kmeans_picks([10, 0, 7], 0.3, seed=6) != picks


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
    write_upstream_shard(tmp_path / "feat", "train", 1, 1, blobs, [60, 60])
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
    (tmp_path / "feat" / "train_1_1.done").write_text("other features")
    stamp = (tmp_path / "km" / "model.pt").stat().st_mtime_ns
    learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 2, seed=0)  # other features: refitted
    assert (tmp_path / "km" / "model.pt").stat().st_mtime_ns != stamp
    with pytest.raises(ValueError, match="needs at least 500 frames"):
        learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 500, seed=0)
