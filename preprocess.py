r"""Make the k-means labels for one HuBERT pre-training iteration: step 1 of each iteration.

    file lists (tsv/, every audio file checked) -> features of the k-means sample (feat/) -> k-means on them
    (km_model/) -> frame labels of train and valid (label/), the features of the other utterances extracted
    on the fly

Everything goes under <exp-dir>/data/<mfcc|hubert_<layer>>/, in upstream's file names and formats where they
are read (tsv/, km_model/, label/), and that folder is train.py's --dataset-path. Iteration 1 (MFCC, 100
clusters on all frames):
    python preprocess.py --root-dir /data/itr1_data/960_extract --exp-dir ./exp --feat-type mfcc
Iteration 2 (layer 6 of the iteration-1 model, 500 clusters fitted on 10 % of the utterances):
    python preprocess.py --root-dir ... --exp-dir ./exp --feat-type hubert --layer-index 6 \
        --checkpoint-path exp/checkpoints_librispeech_hubert_pretrain_base/epoch=...ckpt \
        --num-cluster 500 --percent 0.1 --num-rank 40 --use-gpu

The work is cut into --num-rank shards of the file lists, done one after the other (default), in parallel with
    python -m torch.distributed.run --standalone --nproc_per_node=N preprocess.py ...
(process k does shards k+1, k+1+N, ...; process 0 fits k-means), or by jobs you spread yourself: --rank R does
shard R of the stage that can run now (its k-means features, or once k-means is fitted its labels; it lists the
corpus only if no file lists exist yet), a run without --rank lists it, fits k-means and finishes what is missing
(--fit-only stops after the fit). Markers (*.done) hold a hash of each output's inputs: a re-run redoes only what
is missing or stale.
"""
import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from utils.common_utils import AUDIO_CHECKS, TsvSummary, create_tsv
from utils.feature_utils import (Extractor, Shard, dump_features, feature_key, file_sha256, hubert_extractor,
                                 mfcc_extractor, read_shards)
from utils.kmeans import (BACKENDS, MODEL, fitted_inertia, import_faiss, kmeans_key, kmeans_picks, learn_kmeans,
                          load_centers)
from utils.labels import FORMATS, is_done, label_paths, label_shard, merge_label_parts, split_key
from utils.versions import log_stack

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
    parser.add_argument("--layer-index", type=int, default=6,
                        help="transformer layer (1-based) for hubert; 0: the transformer's input")
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
    parser.add_argument("--rank", type=int, default=None,
                        help="do only shard R of --num-rank (for jobs you spread yourself), of the stage that can run "
                             "now: its k-means features before the fit, its labels once k-means is fitted")
    parser.add_argument("--fit-only", action="store_true",
                        help="stop once k-means is fitted (then --rank jobs write the labels)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave unusable audio files out of the file lists instead of stopping")
    parser.add_argument("--label-format", choices=FORMATS, default="text",
                        help="text: upstream's label_{split}.pt; npy: label_{split}.npy + label_{split}.offsets.npy, "
                             "half the size and memory-mapped by train.py (for Libri-Light-sized corpora)")
    parser.add_argument("--audio-check", choices=AUDIO_CHECKS, default="tail",
                        help="how each audio file is checked before any heavy work: header only; tail: also decode "
                             "its last samples after a seek (catches truncated files); full: decode it all (also "
                             "catches corrupt frames; ~10x the cost of tail)")
    args = parser.parse_args(argv)
    if args.num_rank < 1 or args.num_cluster < 1:
        parser.error("--num-rank and --num-cluster must be at least 1")
    if args.rank is not None and not 1 <= args.rank <= args.num_rank:
        parser.error(f"--rank must be in [1, --num-rank={args.num_rank}], got {args.rank}")
    if args.rank is not None and args.fit_only:
        parser.error("--fit-only is for the run that fits k-means, not for a --rank job")
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


@dataclass
class Job:
    """What every stage needs: the arguments, this process's place among the workers, the features."""
    args: argparse.Namespace
    world_size: int
    rank: int
    device: torch.device
    extractor: Extractor
    data_dir: Path

    def __post_init__(self):
        self.tsv_dir, self.feat_dir, self.km_dir, self.label_dir = (
            self.data_dir / d for d in ("tsv", "feat", "km_model", "label"))
        self.splits = ["train", "valid"] if self.args.valid_percent > 0 else ["train"]

    def mine(self, shards: List[Shard]) -> List[Shard]:
        """This process's shards: --rank R, or every world_size-th from its rank."""
        if self.args.rank:
            return [shards[self.args.rank - 1]]
        return shards[self.rank::self.world_size]


def setup(args) -> Job:
    """The job of this process; reads the checkpoint (and imports faiss) first, so a bad one fails early."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world_size > 1 and args.rank is not None:
        raise ValueError("--rank is for jobs you start yourself; under torch.distributed.run leave it out")
    device = pick_device(args, int(os.environ.get("LOCAL_RANK", 0)))
    if args.kmeans_backend == "faiss":
        import_faiss()
    if args.feat_type == "mfcc":
        extractor, data_dir = mfcc_extractor(), args.exp_dir / "data" / "mfcc"
    else:
        extractor = hubert_extractor(args.checkpoint_path, args.layer_index, device)
        data_dir = args.exp_dir / "data" / f"hubert_{args.layer_index}"
    if world_size > 1:
        # Process 0 fits k-means while the others wait at a barrier: allow for a long fit.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    return Job(args, world_size, rank, device, extractor, data_dir)


def make_file_lists(job: Job) -> TsvSummary:
    args = job.args
    return create_tsv(args.root_dir, job.tsv_dir, args.dataset, args.valid_percent, args.seed,
                      skip_bad=args.skip_bad, check=args.audio_check)


@dataclass
class Plan:
    """The shards of each split, the utterances k-means fits on and the key of that fit: all known from the
    file lists before any feature is extracted."""
    shards: Dict[str, List[Shard]]
    picks: List[Optional[List[int]]]  # per train shard; None = all its utterances
    kmeans_key: str

    @classmethod
    def read(cls, job: Job) -> "Plan":
        args = job.args
        shards = {split: read_shards(job.tsv_dir / f"{args.dataset}_{split}.tsv", split, args.num_rank)
                  for split in job.splits}
        picks = kmeans_picks([len(shard.lines) for shard in shards["train"]], args.percent, args.seed)
        keys = [feature_key(shard, job.extractor, keep) for shard, keep in zip(shards["train"], picks)]
        return cls(shards, picks, kmeans_key(keys, args.num_cluster, args.seed, args.kmeans_backend))

    def keep(self, shard: Shard) -> Optional[Sequence[int]]:
        """The utterances of a shard whose features are stored: the k-means sample (none of valid)."""
        return self.picks[shard.rank - 1] if shard.split == "train" else ()


def dump_kmeans_features(job: Job, plan: Plan) -> None:
    """Step 2: the features k-means fits on (train only; with --percent only the sampled utterances)."""
    for shard in job.mine(plan.shards["train"]):
        dump_features(shard, job.feat_dir, job.extractor, plan.keep(shard))


def fit(job: Job) -> float:
    """Step 3: k-means on the stored train features; the valid split is labelled with this model too."""
    args = job.args
    return learn_kmeans(job.feat_dir, "train", args.num_rank, job.km_dir, args.num_cluster, args.seed,
                        args.kmeans_backend, gpu=job.device.type == "cuda")


def write_label_parts(job: Job, plan: Plan) -> None:
    """Step 4: the label part of each of this process's shards, of train and valid, that is not done yet."""
    centers, model_key = load_centers(job.km_dir, job.device), file_sha256(job.km_dir / MODEL)
    fmt = job.args.label_format
    for split in job.splits:
        key = split_key(plan.shards[split], job.extractor, model_key, fmt)
        if is_done(label_paths(job.label_dir, split, fmt=fmt), key):
            log.info("%s labels are already done", split)
            continue
        for shard in job.mine(plan.shards[split]):
            label_shard(shard, job.extractor, job.feat_dir, job.label_dir, centers, model_key, plan.keep(shard), fmt)


def merge_labels(job: Job, plan: Plan) -> List[str]:
    """Join the label parts of each split into label_{split}.pt (upstream's file) or the npy pair; returns the
    names of the labels written."""
    model_key, fmt = file_sha256(job.km_dir / MODEL), job.args.label_format
    for split in job.splits:
        key = split_key(plan.shards[split], job.extractor, model_key, fmt)
        if not is_done(label_paths(job.label_dir, split, fmt=fmt), key):
            merge_label_parts(job.label_dir, plan.shards[split], job.extractor, model_key, fmt, job.args.num_cluster)
    return [label_paths(job.label_dir, split, fmt=fmt)[0].name for split in job.splits]


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(funcName)s: %(message)s" if args.debug else "%(message)s")
    log_stack("preprocess.py", log.info, log.warning)
    start_time = time.perf_counter()
    job = setup(args)
    lists = [job.tsv_dir / f"{args.dataset}_{split}.tsv" for split in job.splits]
    if args.rank and all(p.is_file() for p in lists):  # an array of jobs: lists (and checks) the corpus once
        log.info("--rank %d uses the file lists in %s (a run without --rank lists the corpus again)", args.rank,
                 job.tsv_dir)
    elif job.rank == 0:
        listing = make_file_lists(job)
    barrier(job.world_size)
    plan = Plan.read(job)
    inertia = fitted_inertia(job.km_dir, plan.kmeans_key)
    if inertia is None:
        dump_kmeans_features(job, plan)
        if args.rank:
            log.info("k-means features of train shard %d/%d done in %.1f s; once every shard's are, run without "
                     "--rank to fit k-means (and write the labels, or add --fit-only and run the --rank jobs "
                     "again for them)", args.rank, args.num_rank, time.perf_counter() - start_time)
            return
        barrier(job.world_size)
        if job.rank == 0:
            inertia = fit(job)
        barrier(job.world_size)
    if args.fit_only:
        log.info("k-means fitted in %.1f s; the --rank jobs now write the label parts", time.perf_counter() - start_time)
        return
    write_label_parts(job, plan)
    if args.rank:
        log.info("labels of shard %d/%d done in %.1f s; once every shard's are, run without --rank to join them",
                 args.rank, args.num_rank, time.perf_counter() - start_time)
        return
    barrier(job.world_size)
    if job.rank == 0:
        label_files = merge_labels(job, plan)
        frames = sum(job.extractor.frames(n) for shards in plan.shards.values() for shard in shards
                     for n in shard.num_samples())
        log.info(
            "done: %d train / %d valid files (%d skipped), %.2f h of audio, %d frames of dim %d, k-means "
            "K=%d inertia %.4f, wrote %s in %s in %.1f s", len(listing.train), len(listing.valid),
            len(listing.skipped), listing.hours(), frames, job.extractor.dim, args.num_cluster, inertia,
            " ".join(label_files), job.label_dir, time.perf_counter() - start_time)
    if job.world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # bad input: say what and where, without a traceback
        sys.exit(f"preprocess.py: error: {e}")
