r"""Make the k-means labels for one HuBERT pre-training iteration: step 1 of each iteration.

    file lists (tsv/) -> MFCC or HuBERT-layer features (feat/) -> k-means on train (km_model/)
    -> frame labels for train and valid (label/)

Everything goes under <exp-dir>/data/<mfcc|hubert_<layer>>/, in upstream's file names and formats, and
that folder is train.py's --dataset-path. Iteration 1 (MFCC, 100 clusters):
    python preprocess.py --root-dir /data/itr1_data/960_extract --exp-dir ./exp --feat-type mfcc
Iteration 2 (layer 6 of the iteration-1 model, 500 clusters fitted on 10 % of the utterances):
    python preprocess.py --root-dir ... --exp-dir ./exp --feat-type hubert --layer-index 6 \
        --checkpoint-path exp/checkpoints_librispeech_hubert_pretrain_base/epoch=...ckpt \
        --num-cluster 500 --percent 0.1 --num-rank 40 --use-gpu

The features are dumped in --num-rank shards: one after the other (default), only shard --rank R (for
jobs you spread yourself; then run once more without --rank to fit k-means and label), or in parallel with
    python -m torch.distributed.run --standalone --nproc_per_node=N preprocess.py ...
where process k dumps shards k+1, k+1+N, ..., process 0 fits k-means, and the labels are split again.
A re-run skips the shards (and the k-means fit) whose inputs did not change.
"""
import argparse
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from utils.common_utils import create_tsv
from utils.feature_utils import dump_features, hubert_extractor, mfcc_extractor, shard_paths
from utils.kmeans import BACKENDS, dump_label_shard, import_faiss, learn_kmeans, load_centers, merge_label_shards

log = logging.getLogger("preprocess")

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_bool(text: str) -> bool:
    """Upstream's ``--use-gpu`` was ``type=bool`` (any string, even "False", meant True): take the legacy
    values literally and refuse anything else."""
    if text.lower() in TRUE + FALSE:
        return text.lower() in TRUE
    raise argparse.ArgumentTypeError(f"expected one of {'/'.join(TRUE + FALSE)}, got {text!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the description's examples kept as written."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="debug log level with function names")
    parser.add_argument("--dataset", default="librispeech", choices=["librispeech", "librilight"],
                        help="name of the TSV file lists: tsv/<dataset>_{train,valid}.tsv")
    parser.add_argument("--root-dir", type=Path, required=True,
                        help="folder searched for **/*.flac; only files with 'train' in their path are used")
    parser.add_argument("--num-rank", type=int, default=5, help="number of shards of the feature files")
    parser.add_argument("--feat-type", default="mfcc", choices=["mfcc", "hubert"], help="features for k-means")
    parser.add_argument("--layer-index", type=int, default=6, help="transformer layer (1-based) for hubert")
    parser.add_argument("--checkpoint-path", type=Path, default=None,
                        help="train.py checkpoint (or state dict) of the model for --feat-type hubert")
    parser.add_argument("--use-gpu", type=parse_bool, nargs="?", const=True, default=False,
                        help="same as --device cuda (bare flag, or legacy --use-gpu True/False)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None,
                        help="device for HuBERT features and labels; None = cpu (cuda with --use-gpu), "
                             "auto = cuda if available")
    parser.add_argument("--exp-dir", type=Path, required=True, help="outputs go to <exp-dir>/data/<feat>/")
    parser.add_argument("--num-cluster", type=int, default=100, help="k of k-means")
    parser.add_argument("--kmeans-backend", choices=BACKENDS, default="sklearn",
                        help="sklearn: upstream's MiniBatchKMeans; faiss: Lloyd's k-means from the same start, "
                             "faster for HuBERT features, on the GPU with --device cuda and faiss-gpu "
                             "(pip install faiss-cpu)")
    parser.add_argument("--percent", type=float, default=-1,
                        help="fraction of the utterances of each shard used to fit k-means; negative = all")
    parser.add_argument("--valid-percent", type=float, default=0.01,
                        help="fraction of the files that go to the valid split; 0 = no valid split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid split, --percent and k-means")
    parser.add_argument("--rank", type=int, default=None, help="dump only feature shard R of --num-rank, then stop")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave unusable audio files out of the file lists instead of stopping")
    args = parser.parse_args(argv)
    if args.num_rank < 1 or args.num_cluster < 1:
        parser.error("--num-rank and --num-cluster must be at least 1")
    if args.rank is not None and not 1 <= args.rank <= args.num_rank:
        parser.error(f"--rank must be in [1, --num-rank={args.num_rank}], got {args.rank}")
    if args.percent == 0 or args.percent > 1:
        parser.error(f"--percent must be negative (all) or in (0, 1], got {args.percent}")
    if not 0 <= args.valid_percent <= 1:
        parser.error(f"--valid-percent must be in [0, 1], got {args.valid_percent}")
    if args.feat_type == "hubert" and args.checkpoint_path is None:
        parser.error("--feat-type hubert needs --checkpoint-path")
    if args.use_gpu and args.device not in (None, "cuda"):
        parser.error(f"--use-gpu contradicts --device {args.device}")
    return args


def pick_device(args, local_rank: int) -> torch.device:
    name = "cuda" if args.use_gpu else (args.device or "cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA was requested (--use-gpu / --device cuda) but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(funcName)s: %(message)s" if args.debug else "%(message)s")
    start_time = time.perf_counter()
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world_size > 1 and args.rank is not None:
        raise ValueError("--rank is for jobs you start yourself; under torch.distributed.run leave it out")
    device = pick_device(args, int(os.environ.get("LOCAL_RANK", 0)))

    # The checkpoint (and faiss, if asked for) is read first: a bad one fails before any long work.
    if args.kmeans_backend == "faiss":
        import_faiss()
    if args.feat_type == "mfcc":
        extractor, data_dir = mfcc_extractor(), args.exp_dir / "data" / "mfcc"
    else:
        extractor = hubert_extractor(args.checkpoint_path, args.layer_index, device)
        data_dir = args.exp_dir / "data" / f"hubert_{args.layer_index}"
    tsv_dir, feat_dir, km_dir, label_dir = (data_dir / d for d in ("tsv", "feat", "km_model", "label"))
    if world_size > 1:
        # Process 0 fits k-means while the others wait at a barrier: allow for a long fit.
        dist.init_process_group("gloo", timeout=timedelta(days=7))

    if rank == 0:
        listing = create_tsv(args.root_dir, tsv_dir, args.dataset, args.valid_percent, args.seed,
                             skip_bad=args.skip_bad)
    barrier(world_size)
    splits = ["train", "valid"] if args.valid_percent > 0 else ["train"]
    my_shards = [args.rank] if args.rank else range(rank + 1, args.num_rank + 1, world_size)
    for split in splits:
        for shard in my_shards:
            dump_features(tsv_dir / f"{args.dataset}_{split}.tsv", feat_dir, split, shard, args.num_rank, extractor)
    if args.rank:
        log.info("shard %d/%d done in %.1f s; run again without --rank (once all shards are done) to fit "
                 "k-means and write the labels", args.rank, args.num_rank, time.perf_counter() - start_time)
        return

    barrier(world_size)
    if rank == 0:  # on train only; valid is labelled with the train model
        inertia = learn_kmeans(feat_dir, "train", args.num_rank, km_dir, args.num_cluster, args.percent, args.seed,
                               args.kmeans_backend, gpu=device.type == "cuda")
    barrier(world_size)
    centers = load_centers(km_dir, device)
    for split in splits:
        for shard in my_shards:
            dump_label_shard(feat_dir, centers, label_dir, split, shard, args.num_rank)
    barrier(world_size)
    if rank == 0:
        label_files = [merge_label_shards(label_dir, split, args.num_rank).name for split in splits]
        frames = sum(int(torch.load(shard_paths(feat_dir, split, r, args.num_rank)[1], weights_only=True).sum())
                     for split in splits for r in range(1, args.num_rank + 1))
        log.info(
            "done: %d train / %d valid files (%d skipped), %.2f h of audio, %d frames of dim %d, k-means "
            "K=%d inertia %.4f, wrote %s in %s in %.1f s", len(listing.train), len(listing.valid),
            len(listing.skipped), listing.hours(), frames, extractor.dim, args.num_cluster, inertia,
            " ".join(label_files), label_dir, time.perf_counter() - start_time)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # bad input: say what and where, without a traceback
        sys.exit(f"preprocess.py: error: {e}")
