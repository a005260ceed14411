"""Steps 3 and 4 of preprocessing (upstream-spec §3.4, §3.5): fit k-means on the train features, then
label every frame of train and valid with its nearest centre.

``km_model/model.pt`` is a joblib pickle of the fitted sklearn ``MiniBatchKMeans`` (as upstream), whichever
backend fitted it; ``km_model/model.done`` (JSON: a hash of the inputs and the inertia) lets a re-run skip the
fit. The optional faiss backend (``pip install faiss-cpu``, or faiss-gpu) runs Lloyd's k-means on every frame
from upstream's greedy k-means++ start: inertia within 1 % of sklearn's, 3-4x faster on CPU for 768-dim
features, on the GPU if faiss has CUDA (bench/kmeans.py).
Labels are written per shard to ``label/label_{split}_{rank}_{num_rank}.part`` and then joined, in shard
order (= TSV order), into ``label/label_{split}.pt``: plain text, one line of cluster ids per utterance.
"""
import hashlib
import importlib
import json
import logging
import shutil
from pathlib import Path
from typing import Optional, Tuple

import joblib
import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans, kmeans_plusplus
from threadpoolctl import threadpool_limits
from torch import Tensor
from tqdm import tqdm

from utils.common_utils import atomic_write
from utils.feature_utils import shard_paths

log = logging.getLogger(__name__)


def load_shard(feat_dir, split: str, rank: int, num_rank: int) -> Tuple[Tensor, Tensor]:
    """A shard's features, memory-mapped (rows are read only when used), and its int64 lengths; checks that
    they agree."""
    feat_path, len_path, _ = shard_paths(feat_dir, split, rank, num_rank)
    for path in (feat_path, len_path):
        if not path.is_file():
            raise FileNotFoundError(f"feature shard {path} is missing (run the feature step for all shards)")
    feats = torch.load(feat_path, mmap=True, weights_only=True)
    lengths = torch.load(len_path, weights_only=True).long()
    if feats.ndim != 2 or feats.shape[0] != lengths.sum():
        raise ValueError(f"{feat_path} has shape {tuple(feats.shape)} but {len_path} sums to "
                         f"{int(lengths.sum())} frames: the shard is inconsistent, delete it and re-run")
    return feats, lengths


def load_feature(feat_dir, split: str, num_rank: int, percent: float, seed: int) -> Tensor:
    """All frames of a split (percent < 0), or those of int(n_utts * percent) random utterances per shard
    (``torch.randperm`` on a generator seeded with ``seed``, picks sorted), as one float32 tensor. Only
    the sampled rows are read from disk."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for rank in range(1, num_rank + 1):
        feats, lengths = load_shard(feat_dir, split, rank, num_rank)
        if percent < 0:
            parts.append(feats)
            continue
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        picks = torch.randperm(len(lengths), generator=generator)[:int(len(lengths) * percent)].sort().values
        rows = [torch.arange(offsets[i], offsets[i + 1]) for i in picks.tolist()]
        parts.append(feats.index_select(0, torch.cat(rows)) if rows else feats[:0])
    return torch.cat(parts)


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
    frames), from ``kmeans_plusplus_init``; on all GPUs when ``gpu`` and faiss has CUDA. On CPU, a seed
    gives the same centres whatever the thread count (tested with 1 and 2)."""
    faiss = import_faiss()
    km = faiss.Kmeans(feats.shape[1], n_clusters, niter=FAISS_NITER, seed=seed,
                      gpu=gpu and faiss.get_num_gpus() > 0,
                      max_points_per_centroid=-(-len(feats) // n_clusters))
    km.train(feats, init_centroids=kmeans_plusplus_init(feats, n_clusters, seed))
    log.info("faiss k-means: %d iterations%s", len(km.obj), " on GPU" if km.gpu else "")
    return as_minibatch_kmeans(km.centroids, float(km.obj[-1]), seed)


def as_minibatch_kmeans(centers: np.ndarray, inertia: float, seed: int) -> MiniBatchKMeans:
    """A fitted MiniBatchKMeans holding ``centers`` (and the fit's total ``inertia``), so model.pt is what
    upstream writes and its .predict, .score and .transform work. Made by sklearn's own fit (on the centres,
    starting from them: nothing moves; two steps, as one sets no inertia) rather than by setting private
    attributes, which change between sklearn versions."""
    km = MiniBatchKMeans(n_clusters=len(centers), init=centers, n_init=1, max_iter=2, batch_size=len(centers),
                         compute_labels=False, reassignment_ratio=0.0, random_state=seed).fit(centers)
    km.cluster_centers_, km.inertia_ = centers, inertia
    return km


def learn_kmeans(feat_dir, split: str, num_rank: int, km_dir, n_clusters: int, percent: float = -1,
                 seed: int = 0, backend: str = "sklearn", gpu: bool = False) -> float:
    """Fit k-means on a split's features and save it to ``km_dir/model.pt``; returns the inertia (mean
    squared distance of a frame to its centre). Skipped when a fit of the same inputs (backend included,
    not ``gpu``) is already saved."""
    km_dir = Path(km_dir)
    km_path, done_path = km_dir / "model.pt", km_dir / "model.done"
    shard_keys = [shard_paths(feat_dir, split, r, num_rank)[2] for r in range(1, num_rank + 1)]
    key = hashlib.sha256(json.dumps([[p.read_text() if p.is_file() else "" for p in shard_keys],
                                     n_clusters, percent, seed, backend]).encode()).hexdigest()
    if km_path.is_file() and done_path.is_file():
        done = json.loads(done_path.read_text())
        if done["key"] == key:
            log.info("k-means model %s is already fitted on these features", km_path)
            return done["inertia"]
    feats = load_feature(feat_dir, split, num_rank, percent, seed).numpy()
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
        joblib.dump(km, f)
    with atomic_write(done_path, "w") as f:
        json.dump({"key": key, "inertia": inertia}, f)
    return inertia


def load_centers(km_dir, device) -> Tensor:
    """The (K, D) cluster centres of the saved k-means model, as float32 on ``device``."""
    km_path = Path(km_dir) / "model.pt"
    if not km_path.is_file():
        raise FileNotFoundError(f"k-means model {km_path} not found (fit k-means first)")
    return torch.as_tensor(joblib.load(km_path).cluster_centers_, dtype=torch.float32, device=device)


def predict(feats: Tensor, centers: Tensor, chunk_frames: Optional[int] = None) -> Tensor:
    """Index of the nearest centre (squared Euclidean distance) of every row, in chunks of rows so memory
    stays bounded (chunk x K distances at a time)."""
    chunk_frames = chunk_frames or max(1, (1 << 24) // len(centers))
    c, c_norm = centers.T, centers.pow(2).sum(1)
    labels = []
    for start in range(0, len(feats), chunk_frames):
        x = feats[start:start + chunk_frames].to(centers.device, torch.float32)
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ c + c_norm
        labels.append(dist.argmin(1).cpu())
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


def label_part_path(label_dir, split: str, rank: int, num_rank: int) -> Path:
    return Path(label_dir) / f"label_{split}_{rank}_{num_rank}.part"


def dump_label_shard(feat_dir, centers: Tensor, label_dir, split: str, rank: int, num_rank: int) -> Path:
    """Label one feature shard and write its lines (one per utterance) to a part file."""
    feats, lengths = load_shard(feat_dir, split, rank, num_rank)
    labels = predict(feats, centers)
    path = label_part_path(label_dir, split, rank, num_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        for utterance in tqdm(labels.split(lengths.tolist()), desc=f"{split} labels {rank}/{num_rank}",
                              unit="utt", leave=False):
            f.write(" ".join(map(str, utterance.tolist())) + "\n")
    return path


def merge_label_shards(label_dir, split: str, num_rank: int) -> Path:
    """Join the part files of a split, in shard order, into ``label_{split}.pt`` and remove them."""
    parts = [label_part_path(label_dir, split, r, num_rank) for r in range(1, num_rank + 1)]
    path = Path(label_dir) / f"label_{split}.pt"
    with atomic_write(path) as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    for part in parts:
        part.unlink()
    return path
