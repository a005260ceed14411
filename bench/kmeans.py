"""k-means fit time and quality: upstream's sklearn MiniBatchKMeans vs the faiss backend, on synthetic
features shaped like iteration 1 (1M x 39 MFCC frames, K=100) and iteration 2 (200k x 768 layer-6 frames,
K=500).

    python bench/kmeans.py               # full size, CPU, and faiss on the GPU when faiss has CUDA
    python bench/kmeans.py --scale 0.1   # a quick run: 10 % of the frames, same K

The frames are a mixture of K Gaussians (unequal weights and spreads), so the inertia (mean squared
distance of a frame to its nearest centre, what preprocess.py logs) can be judged against that of the
mixture's own means, the "generating centres" row. Each fit goes through utils.kmeans.fit_kmeans (sklearn:
upstream's settings, n_init=20, max_iter=100, batch_size=10000) with the thread count fixed by --threads.
On a machine shared with other jobs, run with OMP_WAIT_POLICY=PASSIVE: busy-waiting OpenMP threads can make
both backends many times slower there.
"""
import argparse
import sys
import time
from pathlib import Path

import joblib
import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from utils.kmeans import BACKENDS, fit_kmeans, import_faiss, predict

SHAPES = [(1_000_000, 39, 100), (200_000, 768, 500)]  # frames, dim, K


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the frames of each shape")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--threads", type=int, default=joblib.cpu_count(only_physical_cores=True),
                   help="OpenMP and BLAS threads (default: physical cores, as preprocess.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the fits")
    return p.parse_args(argv)


def mixture(n: int, dim: int, k: int, seed: int):
    """n frames from k Gaussians: means ~ N(0, I), Dirichlet(2) weights, spreads in [0.5, 1]; and the means."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, dim), dtype=np.float32)
    component = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 2.0)))
    spread = rng.uniform(0.5, 1.0, size=k).astype(np.float32)
    feats = rng.standard_normal((n, dim), dtype=np.float32)
    feats *= spread[component, None]
    feats += means[component]
    return feats, means


def inertia(feats: np.ndarray, centers: np.ndarray, chunk: int = 65536) -> float:
    """Mean squared distance of a frame to its nearest centre, summed in float64."""
    c = torch.from_numpy(centers)
    total = 0.0
    for start in range(0, len(feats), chunk):
        x = torch.from_numpy(feats[start:start + chunk])
        total += float((x - c[predict(x, c)]).pow(2).sum(1).double().sum())
    return total / len(feats)


def variants(backends):
    """(name, backend, gpu) of each fit to time: faiss on the GPU too when its build has CUDA."""
    rows = [(name, name, False) for name in backends]
    if "faiss" in backends and import_faiss().get_num_gpus() > 0:
        rows.append(("faiss-gpu", "faiss", True))
    return rows


def main(argv=None):
    args = parse_args(argv)
    rows = variants(args.backends)
    print(f"k-means fits, {args.threads} CPU threads, scale {args.scale:g}, seed {args.seed}")
    print(f"{'backend':<20}{'frames x dim':>16}{'K':>6}{'seconds':>10}{'inertia':>12}{'vs generating':>15}")
    for n, dim, k in SHAPES:
        feats, means = mixture(int(n * args.scale), dim, k, args.seed)
        shape = f"{len(feats)} x {dim}"
        reference = inertia(feats, means)
        print(f"{'generating centres':<20}{shape:>16}{k:>6}{'-':>10}{reference:>12.4f}{'':>15}", flush=True)
        for name, backend, gpu in rows:
            with threadpool_limits(limits=args.threads):
                start = time.perf_counter()
                centers = fit_kmeans(feats, k, args.seed, backend, gpu).cluster_centers_
                seconds = time.perf_counter() - start
            value = inertia(feats, centers)
            print(f"{name:<20}{shape:>16}{k:>6}{seconds:>10.1f}{value:>12.4f}{value / reference - 1:>+15.2%}",
                  flush=True)


if __name__ == "__main__":
    main()
