"""The optional faiss k-means backend: it finds the clusters at least as well as sklearn, is seeded and
thread-count independent, saves the same model.npy (the centres) and runs in preprocess.py;
without faiss it says how to install it.

No test here may have "train" in its name (see tests/test_common_utils.py).
"""
import importlib.util

import joblib
import numpy as np
import pytest
import torch
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits

from preprocess import main
from tests.test_common_utils import make_corpus
from tests.test_kmeans import write_upstream_shard
from tests.test_preprocess import files_of, old_path, run_args
from utils.feature_utils import mfcc_extractor
from utils.kmeans import fit_kmeans, import_faiss, learn_kmeans, load_centers, predict

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss is not installed")


def blobs(n_blobs=20, per_blob=150, dim=16, seed=0):
    """Well-separated Gaussian blobs of unequal sizes (centres ~10 apart, spread 0.3) and each row's blob."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, dim)).astype(np.float32) * 3
    truth = np.repeat(np.arange(n_blobs), rng.integers(per_blob // 2, per_blob * 2, n_blobs))
    feats = centres[truth] + 0.3 * rng.standard_normal((len(truth), dim)).astype(np.float32)
    return feats, centres, truth


def mean_sq_dist(feats, centres):
    return float(torch.cdist(torch.from_numpy(feats).double(), torch.from_numpy(centres).double()).min(1)
                 .values.pow(2).mean())


@needs_faiss
def test_faiss_finds_the_blobs_as_well_as_sklearn():
    feats, centres, truth = blobs()
    km = fit_kmeans(feats, len(centres), seed=0, backend="faiss")
    found = km.cluster_centers_
    assert isinstance(km, MiniBatchKMeans) and found.dtype == np.float32 and found.shape == centres.shape
    nearest = torch.cdist(torch.from_numpy(centres), torch.from_numpy(found)).min(1).indices.numpy()
    assert sorted(nearest.tolist()) == list(range(len(centres)))  # one found centre per blob
    blob_means = np.stack([feats[truth == b].mean(0) for b in range(len(centres))])
    np.testing.assert_allclose(found[nearest], blob_means, atol=1e-5)  # the optimum: each blob's mean
    labels = predict(torch.from_numpy(feats), torch.from_numpy(found)).numpy()
    assert (labels == nearest[truth]).all()  # every row in its blob's cluster
    sklearn_centres = fit_kmeans(feats, len(centres), seed=0).cluster_centers_
    assert mean_sq_dist(feats, found) <= mean_sq_dist(feats, sklearn_centres) * (1 + 1e-6)


@needs_faiss
def test_faiss_fit_is_seeded_and_the_model_works_like_sklearns(tmp_path):
    feats, centres, _ = blobs(n_blobs=30, dim=8, seed=1)
    k = 24  # fewer than the blobs: the optimum is not obvious, so starts and iterations matter
    km = fit_kmeans(feats, k, seed=3, backend="faiss")
    assert np.array_equal(fit_kmeans(feats, k, seed=3, backend="faiss").cluster_centers_, km.cluster_centers_)
    with threadpool_limits(limits=1):
        assert np.array_equal(fit_kmeans(feats, k, seed=3, backend="faiss").cluster_centers_, km.cluster_centers_)

    joblib.dump(km, tmp_path / "model.pt")
    loaded = joblib.load(tmp_path / "model.pt")
    x = torch.from_numpy(feats)
    assert (loaded.predict(feats) == predict(x, torch.from_numpy(km.cluster_centers_)).numpy()).all()
    assert -loaded.score(feats) / len(feats) == pytest.approx(mean_sq_dist(feats, km.cluster_centers_), rel=1e-5)
    assert loaded.transform(feats[:5]).shape == (5, k)


@needs_faiss
def test_learn_kmeans_saves_a_model_that_loads_and_knows_its_backend(tmp_path):
    feats, centres, _ = blobs(n_blobs=3, per_blob=60, dim=2)
    half = len(feats) // 2
    write_upstream_shard(tmp_path / "feat", "train", 1, 1, torch.from_numpy(feats), [half, len(feats) - half])
    inertia = learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 3, seed=0, backend="faiss")
    centers = np.load(tmp_path / "km/model.npy", allow_pickle=False)
    assert centers.dtype == np.float32
    assert torch.equal(load_centers(tmp_path / "km", "cpu"), torch.from_numpy(centers))
    assert inertia == pytest.approx(mean_sq_dist(feats, centers), rel=1e-5)
    assert inertia == pytest.approx(2 * 0.3 ** 2, rel=0.3)  # 2 dims x 0.3^2 variance
    stamp = (tmp_path / "km/model.npy").stat().st_mtime_ns
    assert learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 3, seed=0, backend="faiss") == inertia
    assert (tmp_path / "km/model.npy").stat().st_mtime_ns == stamp
    learn_kmeans(tmp_path / "feat", "train", 1, tmp_path / "km", 3, seed=0)  # another backend: refitted
    assert (tmp_path / "km/model.npy").stat().st_mtime_ns != stamp


@needs_faiss
def test_preprocess_with_faiss_refits_and_writes_the_same_files(tmp_path):
    """A sklearn run, then a faiss run in the same folder: the features are kept, k-means is refitted (the
    backend is part of its key) and the labels are rewritten, in the same files."""
    make_corpus(tmp_path / "corpus")
    main(run_args(tmp_path / "corpus", tmp_path))
    data = tmp_path / "data/mfcc"
    sklearn_files = files_of(data)
    main(run_args(tmp_path / "corpus", tmp_path, "--kmeans-backend", "faiss"))
    faiss_files = files_of(data)
    assert set(faiss_files) == set(sklearn_files)
    assert [name for name in faiss_files if faiss_files[name] != sklearn_files[name]] == [
        "km_model/model.done", "km_model/model.npy", "label/label_train.done", "label/label_train.pt",
        "label/label_valid.done", "label/label_valid.pt"]
    centers = load_centers(data / "km_model", "cpu")
    assert centers.shape == (4, 39)
    _, old_labels = old_path(data, mfcc_extractor(), tmp_path / "old", 3)
    for split in ("train", "valid"):
        assert (data / f"label/label_{split}.pt").read_text() == old_labels(split, centers)


def test_missing_faiss_says_how_to_install_it():
    """The real import path, given a module name that cannot exist (faiss itself may be installed here)."""
    with pytest.raises(ImportError, match=r"No module named 'faiss_absent'.*pip install faiss-cpu"):
        import_faiss("faiss_absent")
