"""HuBERT pre-training (Lightning) on CPU, NVIDIA GPU or Habana HPU.

    # one iteration-1 run on 8 Gaudi cards, as Habana's README:
    python -m torch.distributed.run --nproc_per_node=8 train.py --dataset-path exp/data/mfcc \\
        --exp-dir exp_iter1 --feature-type mfcc --num-class 100 --hpus 8 --num-nodes 1 ...
    # the same on 8 NVIDIA GPUs: --gpus 8 instead of --hpus 8; on CPU: --accelerator cpu --devices N
"""
import argparse
import ast
import logging
import re
from functools import partial
from pathlib import Path
from typing import Optional

import utils.habana_env  # noqa: F401  (first: Habana's autocast op lists, set before torch loads)
import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from dataset import BucketAligner, bucket_boundaries
from health.callback import HealthCallback, SkipGuard
from health.checks import dataset_label_findings
from lightning import MAX_LEN, MIN_LEN, SAMPLE_RATE, HuBERTPreTrainModule, checkpoint_dir
from model import FACTORIES
from utils.callbacks import CheckpointKeeper, TrainStatCallback, progress_bars
from utils.checkpoint import exit_if_done, load_checkpoint
from utils.device import (PRECISIONS, check_devices, compile_backend, configure_process, fast_cpu_bf16,
                          hpu_accelerator_and_strategy, make_deterministic, resolve_precision,
                          set_hpu_autocast_lists)
from utils.launch import cluster_environment, default_num_nodes, launched_processes
from utils.loggers import run_loggers
from utils.preemption import Preemption
from utils.versions import log_stack

SCRIPT_DIR = Path(__file__).resolve().parent

# Training defaults: upstream's (HuBERT Base), except for models with a recipe of their own. A flag given on
# the command line always wins.
UPSTREAM_DEFAULTS = dict(learning_rate=0.0005, warmup_updates=32000, max_updates=250000, seconds_per_batch=87.5,
                         unmasked_weight=0.0, feature_weight=10.0, precision="auto")
RECIPES = {
    # The CPU recipe of the tiny model (docs/tiny_study.md, docs/real_speech.md): ~20 minutes on 2 cores, in bf16
    # where the CPU multiplies bf16 in hardware.
    "hubert_pretrain_tiny": dict(learning_rate=0.002, warmup_updates=250, max_updates=2300, seconds_per_batch=16,
                                 unmasked_weight=0.5, feature_weight=0.0,
                                 precision="bf16" if fast_cpu_bf16() else "auto"),
}


def recipe_help(name: str) -> str:
    """'default X; hubert_pretrain_tiny: Y' for the help of a flag with per-model defaults."""
    per_model = "".join(f"; {model}: {recipe[name]}" for model, recipe in RECIPES.items() if name in recipe)
    return f"(default {UPSTREAM_DEFAULTS[name]}{per_model})"


def parse_betas(text: str):
    """'0.9,0.98', '(0.9, 0.98)' or '0.9 0.98' (upstream's type=Tuple could not parse anything)."""
    parts = [t for t in re.split(r"[\s,()]+", text) if t]
    try:
        b1, b2 = (float(t) for t in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--betas wants two floats like 0.9,0.98, got {text!r}")
    return b1, b2


def parse_grad_mult(text: str):
    """A scale in (0, 1]; 1 means unscaled (the model's None: torchaudio's factories refuse 1.0)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--feature-grad-mult must be in (0, 1], got {text}")
    return None if value == 1 else value


def parse_model_arg(text: str):
    """'name=value' with a Python literal value ('mask_prob=0.65', 'encoder_layer_norm_first=True')."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"--model-arg wants NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value  # a bare string, e.g. label_embedding_init=normal


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset-path", type=Path, required=True, help="<exp>/data/<feat>/ made by preprocess.py (tsv/, label/)")
    a("--resume-checkpoint", default="auto",
      help="checkpoint to resume training from; auto (default): the run's last.ckpt when --exp-dir has one, so a "
           "relaunch of the same command continues the run; none: start afresh")
    a("--feature-type", choices=["mfcc", "hubert"], required=True, help="mfcc labels are 100 Hz, halved to 50 Hz")
    a("--feature-grad-mult", type=parse_grad_mult, default=0.1,
      help="CNN gradient scale in (0, 1] (base and tiny models; 1 = unscaled)")
    a("--num-classes", type=int, required=True, help="number of k-means clusters of the labels (100, 500)")
    a("--model-name", default="hubert_pretrain_base", choices=sorted(FACTORIES))
    a("--exp-dir", type=Path, default=Path("./exp"), help="checkpoints and logs go here")
    a("--dataset", default="librispeech", choices=["librispeech", "librilight"])
    a("--learning-rate", type=float, default=None, help="peak learning rate " + recipe_help("learning_rate"))
    a("--betas", type=parse_betas, default=(0.9, 0.98), help="Adam betas, e.g. 0.9,0.98")
    a("--eps", type=float, default=1e-6, help="Adam epsilon")
    a("--weight-decay", type=float, default=0.01)
    a("--clip-norm", type=float, default=10.0, help="global gradient-norm clip")
    a("--num-nodes", type=int, default=None,
      help="machines; default: from the launcher (torch.distributed.run / SLURM), else 1 (upstream: 4)")
    a("--gpus", type=int, default=-1, help="NVIDIA GPUs per node (> -1 selects CUDA)")
    a("--hpus", type=int, default=-1, help="Habana HPUs per node (> -1 selects HPU)")
    a("--accelerator", default="cpu", choices=["cpu", "gpu", "hpu"], help="when neither --gpus nor --hpus")
    a("--devices", type=int, default=1, help="devices (processes) per node with --accelerator")
    a("--warmup-updates", type=int, default=None, help="linear LR warm-up " + recipe_help("warmup_updates"))
    a("--max-updates", type=int, default=None,
      help="optimizer updates; also the LR schedule length " + recipe_help("max_updates"))
    a("--seconds-per-batch", type=float, default=None,
      help="audio seconds per device per micro-batch " + recipe_help("seconds_per_batch"))
    a("--all-static", action="store_true", help="--static-logit-generator --static-indexing --static-layerdrop")
    a("--static-logit-generator", action="store_true", help="logits of all frames (fixed shapes)")
    a("--static-indexing", action="store_true", help="torch.where instead of boolean-index writes")
    a("--static-layerdrop", action="store_true", help="layer drop with torch.where (every layer computed)")
    a("--no-layerdrop", action="store_true", help="disable layer drop")
    a("--skip-steps", type=int, default=1, help="steps excluded from the throughput timer")
    a("--max-skips-in-a-row", type=int, default=100,
      help="stop (exit status 1, final checkpoint written) after this many skipped updates in a row; 0: never")
    a("--dist-dataset", type=int, choices=[0, 1], default=1, help="0 with 1 HPU: single-device strategy")
    a("--debug", action="store_true", help="debug logging")
    a("--check-val-every-n-epoch", type=int, default=1)
    a("--val-check-interval", type=int, default=None,
      help="validate (and checkpoint) every N updates instead of every --check-val-every-n-epoch epochs")
    a("--num-sanity-val-steps", type=int, default=0)
    a("--align-buckets", choices=["none", "bucket1", "bucket2"], default="none",
      help="pad batches to bucket boundaries (bucket1: also in the batch budget)")
    a("--num-buckets", type=int, default=1000, help="length buckets of the train sampler")
    a("--accumulate-grad-batches", type=int, default=1,
      help="micro-batches per optimizer update (gradients averaged: Habana summed, so its clip 10 is --clip-norm 5 "
           "with 2)")
    a("--use-conv2d", action="store_true", help="conv2d feature extractor")
    a("--use-instancenorm", action="store_true", help="InstanceNorm instead of GroupNorm")
    a("--all-deterministic", action="store_true", help="all dropouts 0, no batch-order shuffle across ranks")
    a("--show-traindataloader-stats", action="store_true", help="print batch shapes and padding")
    a("--optimizer", choices=["adamw", "fusedadamw"], default="adamw")
    a("--use-fused-clip", action="store_true", help="fused gradient clipping")
    a("--log-every-n-steps", type=int, default=300)
    a("--use-max-sub-softmax-opt", action="store_true", help="accepted; SDPA's softmax is fused on every device")
    a("--recompilation-optimization", action="store_true", help="HPU graph break per layer with layer drop")
    a("--split-logits", action="store_true", help="class matmul in two chunks (less memory)")
    a("--save-1d-ckpt", action="store_true", help="write conv weights in the conv1d layout")
    a("--legacy-weight-norm", action="store_true",
      help="write the positional conv's weight norm as weight_g/weight_v (torchaudio 2.0, Habana's scripts)")
    a("--save-top-k", type=int, default=5, help="checkpoints kept for the lowest val_loss, and for train_loss")
    a("--precision", choices=PRECISIONS, default=None,
      help="auto: bf16 autocast + TF32 on --gpus; on --hpus and CPU bf16 only with --autocast (upstream) "
      + recipe_help("precision"))
    a("--autocast", dest="use_autocast", action="store_true", help="bf16 autocast (HPU op lists, CUDA, CPU)")
    a("--autocast-bf16", default="ops_bf16_hubert.txt", help="HPU bf16 op list, relative to this script")
    a("--autocast-fp32", default="ops_fp32_hubert.txt", help="HPU fp32 op list, relative to this script")
    a("--num-workers", type=int, default=10, help="data loader worker processes per device")
    a("--compile", action="store_true", help="torch.compile the model (pair with --all-static --align-buckets bucket1)")
    a("--seed", type=int, default=1337)
    a("--deterministic", action="store_true",
      help="deterministic kernels only (GPUs: resumed runs end bit for bit at an uninterrupted run's weights; slower)")
    a("--masked-weight", type=float, default=1.0, help="loss weight of the masked frames")
    a("--unmasked-weight", type=float, default=None,
      help="loss weight of the unmasked frames " + recipe_help("unmasked_weight"))
    a("--feature-weight", type=float, default=None,
      help="weight of the CNN feature penalty " + recipe_help("feature_weight"))
    a("--model-arg", type=parse_model_arg, action="append", default=[], metavar="NAME=VALUE",
      help="override a hubert_pretrain_model argument, e.g. encoder_layer_norm_first=True (repeatable)")
    args = p.parse_args(argv)
    for name, value in {**UPSTREAM_DEFAULTS, **RECIPES.get(args.model_name, {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    problem = check_args(args)
    if problem:
        p.error(problem)
    if args.all_static:
        args.static_logit_generator = args.static_indexing = args.static_layerdrop = True
    return args


def check_args(args) -> str:
    """The first flag combination that would fail later (or train nonsense), or ''."""
    at_least = {"--accumulate-grad-batches": (args.accumulate_grad_batches, 1), "--num-buckets": (args.num_buckets, 1),
                "--val-check-interval": (args.val_check_interval, 1), "--num-workers": (args.num_workers, 0),
                "--check-val-every-n-epoch": (args.check_val_every_n_epoch, 1), "--save-top-k": (args.save_top_k, 0),
                "--log-every-n-steps": (args.log_every_n_steps, 1), "--num-nodes": (args.num_nodes, 1)}
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            return f"{flag} must be at least {low}, got {value}"
    if args.gpus == 0 or args.hpus == 0 or args.devices < 1:
        return "--gpus, --hpus and --devices count devices per node: give at least 1"
    if args.gpus > -1 and args.hpus > -1:
        return "use either --gpus or --hpus, not both"
    if not 0 < args.warmup_updates < args.max_updates:
        return f"need 0 < --warmup-updates ({args.warmup_updates}) < --max-updates ({args.max_updates})"
    if not args.clip_norm > 0:
        return f"--clip-norm must be positive, got {args.clip_norm}"
    try:
        resolve_precision(args.precision, accelerator_name(args), args.use_autocast)
    except ValueError as e:
        return str(e)
    longest, what = MAX_LEN, "the longest training utterance"
    if args.align_buckets == "bucket1":  # the batch budget counts every utterance at its bucket-aligned length
        longest = BucketAligner(tuple(bucket_boundaries(args.num_buckets, MIN_LEN, MAX_LEN).tolist()))(MAX_LEN)
        what = f"what --align-buckets bucket1 with {args.num_buckets} buckets counts the longest utterance as"
    if args.seconds_per_batch * SAMPLE_RATE < longest:
        return (f"--seconds-per-batch {args.seconds_per_batch:g} is below {longest / SAMPLE_RATE:g} s ({longest} "
                f"samples), {what}: every batch must be able to hold one")
    return ""


def check_dataset_path(args) -> None:
    """preprocess.py's files must be there (named when not), before anything is built."""
    missing = [rel for split in ("train", "valid")
               for rel in (f"tsv/{args.dataset}_{split}.tsv", f"label/label_{split}.pt")
               if not (args.dataset_path / rel).is_file()]
    if missing:
        raise SystemExit(f"train.py: error: --dataset-path {args.dataset_path} lacks {', '.join(missing)}; "
                         "it is the <exp-dir>/data/<feature>/ folder that preprocess.py writes")


def accelerator_name(args) -> str:
    return "hpu" if args.hpus > -1 else "gpu" if args.gpus > -1 else args.accelerator


def accelerator_and_strategy(args, num_nodes: int, find_unused_parameters: bool):
    """(accelerator, devices, strategy) for the Trainer, checking the device exists. DDP searches for parameters
    without a gradient after every backward only when ``find_unused_parameters``."""
    if args.hpus > -1:
        check_devices("hpu", args.hpus)
        accelerator, strategy = hpu_accelerator_and_strategy(
            args.hpus, num_nodes, single=args.dist_dataset == 0, find_unused_parameters=find_unused_parameters)
        return accelerator, args.hpus, strategy
    accelerator, devices = accelerator_name(args), (args.gpus if args.gpus > -1 else args.devices)
    check_devices(accelerator, devices)
    if devices > 1 or num_nodes > 1 or launched_processes() > 1:
        return accelerator, devices, DDPStrategy(find_unused_parameters=find_unused_parameters)
    return accelerator, devices, "auto"


def drops_layers(module: HuBERTPreTrainModule) -> bool:
    """Whether an update can leave a layer without a gradient: layer drop at the model's rate (its config's:
    HuBERT Large and X-Large have 0; --no-layerdrop and --model-arg encoder_layer_drop=... included), unless
    --static-layerdrop computes every layer. Else DDP's search for unused parameters is not paid for."""
    transformer = module.model.wav2vec2.encoder.transformer
    return transformer.layer_drop > 0 and not module.hparams.static_layerdrop


def resume_from(args) -> Optional[Path]:
    """The checkpoint --resume-checkpoint names. auto: the run's newest state (``last.ckpt``, whatever stopped
    the run: a kill, a preemption, a node restart) when there is one, so torchrun's restarts, SLURM's requeues
    and a plain relaunch continue the run exactly, and a finished run's relaunch says it is done."""
    if args.resume_checkpoint == "auto":
        last = checkpoint_dir(args.exp_dir, args.dataset, args.model_name) / "last.ckpt"
        return last.resolve() if last.exists() else None  # the file, not the link rank 0 will move
    return None if args.resume_checkpoint in (None, "none") else Path(args.resume_checkpoint)


def build(args):
    """The Trainer and the LightningModule for these arguments (nothing runs yet)."""
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO)
    log_stack("train.py", rank_zero_info, rank_zero_only(logging.warning))
    args.resume_checkpoint = resume_from(args)
    if args.resume_checkpoint is not None:
        try:  # fail now, naming the file, rather than deep inside Lightning
            resumed = load_checkpoint(args.resume_checkpoint)
        except (OSError, ValueError) as e:
            raise SystemExit(f"train.py: error: --resume-checkpoint: {e}")
        exit_if_done(args.resume_checkpoint, resumed, args.max_updates)
    precision = resolve_precision(args.precision, accelerator_name(args), args.use_autocast)
    if precision.autocast and args.hpus > -1:  # before anything imports habana_frameworks
        set_hpu_autocast_lists(str(SCRIPT_DIR / args.autocast_bf16), str(SCRIPT_DIR / args.autocast_fp32))
    pl.seed_everything(args.seed, workers=True)
    if args.deterministic:
        make_deterministic()
    module = HuBERTPreTrainModule(
        model_name=args.model_name, feature_grad_mult=args.feature_grad_mult, num_classes=args.num_classes,
        dataset=args.dataset, dataset_path=str(args.dataset_path), feature_type=args.feature_type,
        seconds_per_batch=args.seconds_per_batch, learning_rate=args.learning_rate, betas=args.betas, eps=args.eps,
        weight_decay=args.weight_decay, clip_norm=args.clip_norm, warmup_updates=args.warmup_updates,
        max_updates=args.max_updates, static_logit_generator=args.static_logit_generator,
        static_indexing=args.static_indexing, static_layerdrop=args.static_layerdrop,
        align_buckets=args.align_buckets, num_buckets=args.num_buckets, accum_steps=args.accumulate_grad_batches,
        use_conv2d=args.use_conv2d, use_instancenorm=args.use_instancenorm,
        all_deterministic=args.all_deterministic, show_traindataloader_stats=args.show_traindataloader_stats,
        no_layerdrop=args.no_layerdrop, use_fused_clip=args.use_fused_clip,
        use_max_sub_softmax_opt=args.use_max_sub_softmax_opt,
        recompilation_optimization=args.recompilation_optimization, split_logits=args.split_logits,
        optimizer_str=args.optimizer, use_autocast=precision.autocast, save_1d_ckpt=args.save_1d_ckpt,
        num_workers=args.num_workers, seed=args.seed,
        loss_weights=(args.masked_weight, args.unmasked_weight, args.feature_weight),
        model_args=dict(args.model_arg), use_compile=args.compile,
        compile_backend=compile_backend(accelerator_name(args)), legacy_weight_norm=args.legacy_weight_norm,
    )
    num_nodes = args.num_nodes or default_num_nodes()
    accelerator, devices, strategy = accelerator_and_strategy(args, num_nodes, drops_layers(module))
    check_dataset_path(args)
    configure_process(precision, accelerator_name(args))
    rank_zero_info(f"precision: {precision.describe(accelerator_name(args))} "
                   f"({devices} {accelerator_name(args).upper()} x {num_nodes} node(s))")
    ckpt_dir = checkpoint_dir(args.exp_dir, args.dataset, args.model_name)
    labels = partial(dataset_label_findings, args.dataset_path, args.feature_type, args.num_classes,
                     dataset=args.dataset)
    callbacks = [CheckpointKeeper(ckpt_dir, args.save_top_k), TrainStatCallback(args.skip_steps),
                 HealthCallback(args.exp_dir, labels), SkipGuard(args.max_skips_in_a_row), Preemption(),
                 *progress_bars()]
    loggers = run_loggers(args.exp_dir)
    trainer = pl.Trainer(
        default_root_dir=args.exp_dir, max_steps=args.max_updates, num_nodes=num_nodes,
        accelerator=accelerator, devices=devices, strategy=strategy, use_distributed_sampler=False,
        plugins=[cluster_environment()], callbacks=callbacks, logger=loggers, enable_checkpointing=False,
        reload_dataloaders_every_n_epochs=1,
        check_val_every_n_epoch=None if args.val_check_interval else args.check_val_every_n_epoch,
        val_check_interval=args.val_check_interval, num_sanity_val_steps=args.num_sanity_val_steps,
        log_every_n_steps=args.log_every_n_steps,
    )
    return trainer, module


def fit(trainer, module, ckpt_path, script: str) -> None:
    """trainer.fit, then an error exit if the skip guard stopped the run, or a signal's (utils/preemption.py)."""
    trainer.fit(module, ckpt_path=ckpt_path)
    guard = next(c for c in trainer.callbacks if isinstance(c, SkipGuard))
    if guard.reason:
        raise SystemExit(f"{script}: error: {guard.reason}")
    preemption = next(c for c in trainer.callbacks if isinstance(c, Preemption))
    if preemption.stopped_by:
        preemption.leave(trainer, script)


def run_train(args):
    trainer, module = build(args)
    fit(trainer, module, args.resume_checkpoint, "train.py")
    return trainer, module


def main(argv=None):
    return run_train(parse_args(argv))


def main_to_end(argv) -> bool:
    """``main(argv)`` for scripts that may be re-run: nothing when the run's ``last.ckpt`` already reached
    ``--max-updates`` (rather than exiting), a resume from it when a run was interrupted. Whether it trained."""
    args = parse_args(argv)
    start = resume_from(args)
    if start is not None and load_checkpoint(start)["global_step"] >= args.max_updates:
        return False
    run_train(args)
    return True


if __name__ == "__main__":
    main()
