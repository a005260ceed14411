"""k-means: the --percent picks, the sample gathered once (the same rows as the old gather), nearest-centre
labels in chunks, and skip of a finished fit."""
import json
import pickle

import joblib
import numpy as np
import pytest
import torch

from utils.common_utils import atomic_write
from utils.feature_shards import shard_paths, write_shard
from tools.convert_kmeans import main as convert_kmeans
from utils.kmeans import (fit_kmeans, fitted_inertia, gather_sample, kmeans_picks, learn_kmeans, load_centers,
                          predict)


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
    centers = np.load(tmp_path / "km" / "model.npy", allow_pickle=False)
    assert centers.shape == (3, 2)
    assert sorted(map(tuple, centers.round().tolist())) == [(0, 0), (0, 5), (5, 5)]
    assert inertia == pytest.approx(0.02, rel=0.5)  # 2 dims x 0.1^2 variance
    assert (fit_kmeans(blobs.numpy(), 3, 0).cluster_centers_ == centers).all()
    assert torch.equal(load_centers(tmp_path / "km", "cpu"), torch.from_numpy(centers))
    stamp = (tmp_path / "km" / "model.npy").stat().st_mtime_ns
    assert learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 3, seed=0) == inertia
    assert (tmp_path / "km" / "model.npy").stat().st_mtime_ns == stamp
    learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 2, seed=0)  # another K: refitted
    assert load_centers(tmp_path / "km", "cpu").shape == (2, 2)
    (tmp_path / "feat" / "train_1_1.done").write_text("other features")
    stamp = (tmp_path / "km" / "model.npy").stat().st_mtime_ns
    learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 2, seed=0)  # other features: refitted
    assert (tmp_path / "km" / "model.npy").stat().st_mtime_ns != stamp
    with pytest.raises(ValueError, match="needs at least 500 frames"):
        learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 500, seed=0)


class WritesMarker:
    """Unpickling this writes a file: the harm a k-means model from elsewhere could do if it were unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def test_a_pickled_model_is_never_loaded_and_an_earlier_versions_converts_in_one_command(tmp_path, capsys):
    km_dir, marker = tmp_path / "km_model", tmp_path / "code_ran"
    km_dir.mkdir()
    (km_dir / "model.done").write_text(json.dumps({"key": "k", "inertia": 0.5}))
    (km_dir / "model.pt").write_bytes(pickle.dumps(WritesMarker(marker)))
    for load in (lambda: load_centers(km_dir, "cpu"), lambda: fitted_inertia(km_dir, "k")):  # labels; a re-run
        with pytest.raises(ValueError, match=f"model.pt: k-means model of an earlier version, a pickle .* "
                                             f"python tools/convert_kmeans.py {km_dir};"):
            load()
    assert fitted_inertia(km_dir, "other inputs") is None  # fitted again, model.pt untouched
    # A .npy holding a pickle (object array) is refused too.
    np.save(km_dir / "model.npy", np.array([WritesMarker(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="model.npy: not a k-means model .*allow_pickle=False"):
        load_centers(km_dir, "cpu")
    np.save(km_dir / "model.npy", np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="model.npy: not a k-means model: expected a \\(K, D\\) array of finite"):
        load_centers(km_dir, "cpu")
    assert not marker.exists()

    # A genuine model of an earlier version (trusted): the one-line conversion, then it loads without pickle.
    (km_dir / "model.npy").unlink()
    km = fit_kmeans(np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32), 4, seed=0)
    joblib.dump(km, km_dir / "model.pt")
    convert_kmeans([str(km_dir)])
    assert "model.pt is no longer read" in capsys.readouterr().out
    assert torch.equal(load_centers(km_dir, "cpu"), torch.from_numpy(km.cluster_centers_))
    assert fitted_inertia(km_dir, "k") == 0.5
