"""Step 3 of preprocessing (upstream-spec §3.4): fit k-means on the train features (the ``--percent`` sample),
and the nearest-centre rule that labels frames (§3.5).

``km_model/model.npy`` holds the (K, D) cluster centres, whichever backend fitted them, read back with
``allow_pickle=False``: upstream's ``model.pt``, a joblib pickle of the fitted sklearn ``MiniBatchKMeans``, runs
code when loaded, so a model from elsewhere could; one left by an earlier version is refused with the command that
converts it (tools/convert_kmeans.py). ``km_model/model.done`` (JSON: a hash of the inputs and the inertia) lets
a re-run skip the fit. The optional faiss backend (``pip install faiss-cpu``, or faiss-gpu) runs Lloyd's k-means
on every frame from upstream's greedy k-means++ start: inertia within 1 % of sklearn's, 3-4x faster on CPU for
768-dim features, on the GPU if faiss has CUDA (bench/kmeans.py).
The labels themselves are written by ``utils.labels``.
"""
import hashlib
import importlib
import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import List, Optional, Sequence

import joblib
import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans, kmeans_plusplus
from threadpoolctl import threadpool_limits
from torch import Tensor
from tqdm import tqdm

from utils.common_utils import atomic_write
from utils.feature_shards import ShardReader, shard_paths

log = logging.getLogger(__name__)


def kmeans_picks(sizes: Sequence[int], percent: float, seed: int) -> List[Optional[List[int]]]:
    """The utterances k-means fits on, as sorted positions per shard of ``sizes`` utterances: all (None) for a
    negative ``percent``, else int(n * percent) of each shard's n, from ``torch.randperm`` on one generator
    seeded with ``seed``, shard after shard (upstream's draw, seeded). They depend on the shard sizes only, so
    they are known before any feature is extracted."""
    if percent < 0:
        return [None] * len(sizes)
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=generator)[:int(n * percent)].sort().values.tolist() for n in sizes]


def gather_sample(feat_dir, split: str, num_rank: int) -> np.ndarray:
    """Every stored frame of a split's shards (the k-means sample: ``dump_features`` stored only that) as one
    float32 array, allocated once and filled shard by shard with plain reads: the sample is held once."""
    with ExitStack() as stack:
        readers = [stack.enter_context(ShardReader(feat_dir, split, r, num_rank)) for r in range(1, num_rank + 1)]
        dims = {reader.dim for reader in readers if reader.rows}
        if len(dims) > 1:
            raise ValueError(f"the {split} feature shards in {feat_dir} have different widths {sorted(dims)}")
        feats = np.empty((sum(reader.rows for reader in readers), dims.pop() if dims else readers[0].dim),
                         dtype=np.float32)
        start = 0
        for reader in tqdm(readers, desc="reading the k-means sample", unit="shard"):
            reader.read(reader.rows, out=feats[start:start + reader.rows])
            start += reader.rows
    return feats


BACKENDS = ("sklearn", "faiss")
FAISS_NITER = 100  # at most; faiss stops once the objective stops changing (~20-60 iterations)
INIT_SIZE, N_INIT = 30000, 3  # k-means++ sample: MiniBatchKMeans's init_size (3 x batch_size); best of N_INIT


def fit_kmeans(feats: np.ndarray, n_clusters: int, seed: int, backend: str = "sklearn",
               gpu: bool = False) -> MiniBatchKMeans:
    """The k-means fit, seeded: upstream's MiniBatchKMeans settings (sklearn) or ``fit_faiss``. Both give a
    fitted MiniBatchKMeans, the object upstream saves. ``gpu`` is for faiss only."""
    if backend == "faiss":
        return fit_faiss(feats, n_clusters, seed, gpu)
    km = MiniBatchKMeans(n_clusters=n_clusters, init="k-means++", max_iter=100, batch_size=10000, verbose=0,
                         compute_labels=False, tol=0.0, max_no_improvement=100, init_size=None, n_init=20,
                         reassignment_ratio=0.0, random_state=seed)
    return km.fit(feats)


def import_faiss(name: str = "faiss"):
    """faiss is optional: imported only when asked for, with a message that says how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"the faiss k-means backend needs faiss ({error}): pip install faiss-cpu "
                          "(or faiss-gpu for CUDA)") from error


def kmeans_plusplus_init(feats: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Upstream's start, which faiss lacks (its k-means++ is the plain kind, which lands far worse in 768-D):
    sklearn's greedy k-means++ on INIT_SIZE random rows, the best of N_INIT by inertia on other rows, as
    MiniBatchKMeans does (with fewer starts: the best start rarely gives the best end)."""
    rng, size = np.random.RandomState(seed), min(INIT_SIZE, len(feats))
    valid = torch.from_numpy(feats[rng.randint(0, len(feats), size)])
    best, best_inertia = None, np.inf
    for _ in range(N_INIT):
        sample = feats[rng.randint(0, len(feats), size)]
        centers = torch.from_numpy(kmeans_plusplus(sample, n_clusters, random_state=rng)[0])
        inertia = float((valid - centers[predict(valid, centers)]).pow(2).sum())
        if inertia < best_inertia:
            best, best_inertia = centers.numpy(), inertia
    return best


def fit_faiss(feats: np.ndarray, n_clusters: int, seed: int, gpu: bool = False) -> MiniBatchKMeans:
    """Lloyd's k-means in faiss on all of ``feats`` (no subsampling, like sklearn; --percent picks the
    frames), from ``kmeans_plusplus_init``; on one GPU when ``gpu`` and faiss has CUDA (faiss's True means every
    GPU of the machine, where preprocess.py's other ranks still hold their models). On CPU, a seed gives the same
    centres whatever the thread count (tested with 1 and 2)."""
    faiss = import_faiss()
    km = faiss.Kmeans(feats.shape[1], n_clusters, niter=FAISS_NITER, seed=seed,
                      gpu=1 if gpu and faiss.get_num_gpus() > 0 else False,
                      max_points_per_centroid=-(-len(feats) // n_clusters))
    km.train(feats, init_centroids=kmeans_plusplus_init(feats, n_clusters, seed))
    log.info("faiss k-means: %d iterations%s", len(km.obj), " on GPU" if km.gpu else "")
    return as_minibatch_kmeans(km.centroids, float(km.obj[-1]), seed)


def as_minibatch_kmeans(centers: np.ndarray, inertia: float, seed: int) -> MiniBatchKMeans:
    """A fitted MiniBatchKMeans holding ``centers`` (and the fit's total ``inertia``), as sklearn's fit gives,
    so its .predict, .score and .transform work. Made by sklearn's own fit (on the centres,
    starting from them: nothing moves; two steps, as one sets no inertia) rather than by setting private
    attributes, which change between sklearn versions."""
    km = MiniBatchKMeans(n_clusters=len(centers), init=centers, n_init=1, max_iter=2, batch_size=len(centers),
                         compute_labels=False, reassignment_ratio=0.0, random_state=seed).fit(centers)
    km.cluster_centers_, km.inertia_ = centers, inertia
    return km


def kmeans_key(shard_keys: Sequence[str], n_clusters: int, seed: int, backend: str) -> str:
    """Hash of a fit's inputs: the feature shards' keys (their done markers), K, the seed and the backend."""
    return hashlib.sha256(json.dumps([list(shard_keys), n_clusters, seed, backend]).encode()).hexdigest()


MODEL, LEGACY_MODEL = "model.npy", "model.pt"


def legacy_model_error(km_dir) -> ValueError:
    """The refusal of an earlier version's pickled model, with the one-line conversion."""
    legacy = Path(km_dir) / LEGACY_MODEL
    return ValueError(f"{legacy}: k-means model of an earlier version, a pickle (which can run code when loaded), so "
                      f"it is not loaded; this version reads the centres from {Path(km_dir) / MODEL}. If you made or "
                      f"trust {legacy}, convert it once (this command unpickles it): python tools/convert_kmeans.py "
                      f"{km_dir}; else delete it and fit k-means again")


def fitted_inertia(km_dir, key: str) -> Optional[float]:
    """The inertia of the saved fit if it was made from the inputs ``key``, else None; an earlier version's
    pickled fit of these inputs is refused (``legacy_model_error``) rather than fitted again."""
    km_dir = Path(km_dir)
    done_path = km_dir / "model.done"
    if not done_path.is_file():
        return None
    try:
        done = json.loads(done_path.read_text())
        if done["key"] != key:
            return None
        inertia = float(done["inertia"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{done_path}: not a k-means done marker (JSON with key and inertia): {e}; delete it to "
                         "fit k-means again") from e
    if not (km_dir / MODEL).is_file():
        if (km_dir / LEGACY_MODEL).is_file():
            raise legacy_model_error(km_dir)
        return None
    return inertia


def learn_kmeans(feat_dir, split: str, num_rank: int, km_dir, n_clusters: int, seed: int = 0,
                 backend: str = "sklearn", gpu: bool = False) -> float:
    """Fit k-means on the stored features of a split's shards and save its centres to ``km_dir/model.npy``;
    returns the inertia (mean squared distance of a frame to its centre). Skipped when a fit of the same inputs (backend
    included, not ``gpu``) is already saved."""
    km_dir = Path(km_dir)
    km_path, done_path = km_dir / MODEL, km_dir / "model.done"
    markers = [shard_paths(feat_dir, split, r, num_rank)[2] for r in range(1, num_rank + 1)]
    key = kmeans_key([p.read_text() if p.is_file() else "" for p in markers], n_clusters, seed, backend)
    inertia = fitted_inertia(km_dir, key)
    if inertia is not None:
        log.info("k-means model %s is already fitted on these features", km_path)
        return inertia
    feats = gather_sample(feat_dir, split, num_rank)
    if len(feats) < n_clusters:
        raise ValueError(f"k-means needs at least {n_clusters} frames (--num-cluster) but got {len(feats)}: "
                         "use more data or a larger --percent")
    log.info("fitting %s k-means with %d clusters on %d frames of dim %d", backend, n_clusters,
             *feats.shape)
    # The sklearn fit depends on its OpenMP thread count (faiss's does not). Fix it to sklearn's default, one
    # per physical core (torch.distributed.run sets OMP_NUM_THREADS=1), so every way of running fits the same
    # model. This limit applies to faiss's OpenMP too.
    with threadpool_limits(limits=joblib.cpu_count(only_physical_cores=True), user_api="openmp"):
        km = fit_kmeans(feats, n_clusters, seed, backend, gpu)
        inertia = float(-km.score(feats) / len(feats))
    log.info("total inertia: %.5f", inertia)
    km_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(km_path) as f:
        np.save(f, np.asarray(km.cluster_centers_), allow_pickle=False)
    with atomic_write(done_path, "w") as f:
        json.dump({"key": key, "inertia": inertia}, f)
    return inertia


def read_centers(path) -> np.ndarray:
    """The (K, D) centres stored at ``path`` (.npy), read without pickle; anything else is refused by name."""
    try:
        centers = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # object arrays (pickles) are a ValueError
        raise ValueError(f"{path}: not a k-means model (a .npy of float centres): {e}") from e
    return check_centers(centers, path)


def check_centers(centers, path) -> np.ndarray:
    """``centers`` if it is a (K, D) array of finite floats, else a ValueError naming ``path``."""
    if not isinstance(centers, np.ndarray) or centers.ndim != 2 or centers.dtype.kind != "f" or not centers.size \
            or not np.isfinite(centers).all():
        raise ValueError(f"{path}: not a k-means model: expected a (K, D) array of finite float centres, got "
                         f"{getattr(centers, 'dtype', type(centers).__name__)} {getattr(centers, 'shape', '')}")
    return centers


def load_centers(km_dir, device) -> Tensor:
    """The (K, D) cluster centres of the saved k-means model, as float32 on ``device``."""
    km_path = Path(km_dir) / MODEL
    if not km_path.is_file():
        if (Path(km_dir) / LEGACY_MODEL).is_file():
            raise legacy_model_error(km_dir)
        raise FileNotFoundError(f"k-means model {km_path} not found (fit k-means first)")
    return torch.as_tensor(read_centers(km_path), dtype=torch.float32, device=device)


def predict_chunk(n_clusters: int) -> int:
    """Rows that ``predict`` labels at a time: 2^24 distances (64 MB)."""
    return max(1, (1 << 24) // n_clusters)


def predict(feats: Tensor, centers: Tensor, chunk_frames: Optional[int] = None) -> Tensor:
    """Index of the nearest centre (squared Euclidean distance) of every row, in chunks of rows so memory
    stays bounded (chunk x K distances at a time)."""
    chunk_frames = chunk_frames or predict_chunk(len(centers))
    c, c_norm = centers.T, centers.pow(2).sum(1)
    labels = []
    for start in range(0, len(feats), chunk_frames):
        x = feats[start:start + chunk_frames].to(centers.device, torch.float32)
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ c + c_norm
        labels.append(dist.argmin(1).cpu())
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
