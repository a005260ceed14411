"""HuBERT pre-training (Lightning) on CPU, NVIDIA GPU or Habana HPU.

    # one iteration-1 run on 8 Gaudi cards, as Habana's README:
    python -m torch.distributed.run --nproc_per_node=8 train.py --dataset-path exp/data/mfcc \\
        --exp-dir exp_iter1 --feature-type mfcc --num-class 100 --hpus 8 --num-nodes 1 ...
    # the same on 8 NVIDIA GPUs: --gpus 8 instead of --hpus 8; on CPU: --accelerator cpu --devices N
"""
import argparse
import ast
import logging
import os
import re
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy

from lightning import HuBERTPreTrainModule, checkpoint_dir
from model import FACTORIES
from utils.checkpoint import load_checkpoint
from utils.device import check_devices, hpu_accelerator_and_strategy, set_hpu_autocast_lists

SCRIPT_DIR = Path(__file__).resolve().parent

# Training defaults: upstream's (HuBERT Base), except for models with a recipe of their own. A flag given on
# the command line always wins.
UPSTREAM_DEFAULTS = dict(learning_rate=0.0005, warmup_updates=32000, max_updates=250000, seconds_per_batch=87.5,
                         unmasked_weight=0.0, feature_weight=10.0)
RECIPES = {
    # The CPU recipe of the tiny model (docs/tiny_study.md, docs/real_speech.md): ~20 minutes on 2 cores.
    "hubert_pretrain_tiny": dict(learning_rate=0.002, warmup_updates=250, max_updates=2500, seconds_per_batch=16,
                                 unmasked_weight=0.5, feature_weight=0.0),
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
    a("--resume-checkpoint", type=Path, default=None, help="checkpoint to resume training from")
    a("--feature-type", choices=["mfcc", "hubert"], required=True, help="mfcc labels are 100 Hz, halved to 50 Hz")
    a("--feature-grad-mult", type=float, default=0.1, help="CNN gradient scale (base and tiny models)")
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
    a("--dist-dataset", type=int, choices=[0, 1], default=1, help="0 with 1 HPU: single-device strategy")
    a("--debug", action="store_true", help="debug logging")
    a("--check-val-every-n-epoch", type=int, default=1)
    a("--val-check-interval", type=int, default=None,
      help="validate every N updates instead of every --check-val-every-n-epoch epochs")
    a("--num-sanity-val-steps", type=int, default=0)
    a("--align-buckets", choices=["none", "bucket1", "bucket2"], default="none",
      help="pad batches to bucket boundaries (bucket1: also in the batch budget)")
    a("--num-buckets", type=int, default=1000, help="length buckets of the train sampler")
    a("--accumulate-grad-batches", type=int, default=1, help="micro-batches per optimizer update (averaged)")
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
    a("--autocast", dest="use_autocast", action="store_true", help="bf16 autocast (HPU op lists, CUDA, CPU)")
    a("--autocast-bf16", default="ops_bf16_hubert.txt", help="HPU bf16 op list, relative to this script")
    a("--autocast-fp32", default="ops_fp32_hubert.txt", help="HPU fp32 op list, relative to this script")
    a("--num-workers", type=int, default=10, help="data loader worker processes per device")
    a("--compile", action="store_true", help="torch.compile the model (pair with --all-static --align-buckets bucket1)")
    a("--seed", type=int, default=1337)
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
    if args.gpus > -1 and args.hpus > -1:
        p.error("use either --gpus or --hpus, not both")
    if not 0 < args.warmup_updates < args.max_updates:
        p.error(f"need 0 < --warmup-updates ({args.warmup_updates}) < --max-updates ({args.max_updates})")
    if args.seconds_per_batch * 16000 < 250000:
        p.error(f"--seconds-per-batch {args.seconds_per_batch} is below 15.625 s, the longest training utterance "
                "(250000 samples): every batch must be able to hold one")
    if args.all_static:
        args.static_logit_generator = args.static_indexing = args.static_layerdrop = True
    return args


def accelerator_and_strategy(args):
    """(accelerator, devices, strategy) for the Trainer, checking the device exists."""
    layer_drop_unused = not (args.no_layerdrop or args.static_layerdrop)  # a dropped layer gets no gradient
    if args.hpus > -1:
        check_devices("hpu", args.hpus)
        accelerator, strategy = hpu_accelerator_and_strategy(
            args.hpus, args.num_nodes or 1, single=args.dist_dataset == 0, find_unused_parameters=layer_drop_unused)
        return accelerator, args.hpus, strategy
    accelerator, devices = ("gpu", args.gpus) if args.gpus > -1 else (args.accelerator, args.devices)
    check_devices(accelerator, devices)
    if devices > 1 or (args.num_nodes or 1) > 1 or _launched_distributed():
        return accelerator, devices, DDPStrategy(find_unused_parameters=layer_drop_unused)
    return accelerator, devices, "auto"


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def default_num_nodes() -> int:
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, world // max(1, local))


class TrainStatCallback(pl.Callback):
    """Rank 0 prints epoch, train and validation times (timing starts after ``skip_steps`` updates) and a
    summary line at the end; the final state is saved as last.ckpt."""

    def __init__(self, skip_steps: int, last_ckpt: Path):
        self.skip_steps = skip_steps
        self.last_ckpt = last_ckpt
        self.fit_start = self.epoch_start = self.val_start = 0.0
        self.timed_start = None

    def on_fit_start(self, trainer, pl_module):
        self.fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.timed_start is None and trainer.global_step >= self.skip_steps:
            self.timed_start = (time.perf_counter(), trainer.global_step)

    def on_validation_epoch_start(self, trainer, pl_module):
        self.val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.is_global_zero and not trainer.sanity_checking:
            print(f"epoch {trainer.current_epoch}: validation {time.perf_counter() - self.val_start:.1f} s")

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            print(f"epoch {trainer.current_epoch}: {time.perf_counter() - self.epoch_start:.1f} s, "
                  f"global step {trainer.global_step}")

    def on_train_end(self, trainer, pl_module):
        """Training usually stops mid-epoch (at --max-updates), after the last checkpoint: keep the final
        state as last.ckpt too."""
        trainer.save_checkpoint(self.last_ckpt)

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        total = time.perf_counter() - self.fit_start
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        rate = ""
        if self.timed_start is not None and trainer.global_step > self.timed_start[1]:
            t0, s0 = self.timed_start
            rate = f", {(time.perf_counter() - t0) / (trainer.global_step - s0):.2f} s/update after warm-up"
        print(f"done: {trainer.global_step} updates in {total / 60:.1f} min{rate}; "
              f"train_loss {m.get('train_loss', float('nan')):.3f}, "
              f"val_loss {m.get('val_loss', float('nan')):.3f}, "
              f"val masked accuracy {m.get('val_masked_accuracy', float('nan')):.3f}, "
              f"skipped steps {pl_module.skipped_steps}")


def build(args):
    """The Trainer and the LightningModule for these arguments (nothing runs yet)."""
    if args.resume_checkpoint is not None:
        try:  # fail now, naming the file, rather than deep inside Lightning
            load_checkpoint(args.resume_checkpoint)
        except (OSError, ValueError) as e:
            raise SystemExit(f"train.py: error: --resume-checkpoint: {e}")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO)
    if args.use_autocast and args.hpus > -1:  # before anything imports habana_frameworks
        set_hpu_autocast_lists(str(SCRIPT_DIR / args.autocast_bf16), str(SCRIPT_DIR / args.autocast_fp32))
    pl.seed_everything(args.seed, workers=True)
    accelerator, devices, strategy = accelerator_and_strategy(args)
    ckpt_dir = checkpoint_dir(args.exp_dir, args.dataset, args.model_name)
    callbacks = [
        ModelCheckpoint(ckpt_dir, monitor="val_loss", mode="min", save_top_k=5, save_last=True, verbose=True),
        ModelCheckpoint(ckpt_dir, monitor="train_loss", mode="min", save_top_k=5, verbose=True),
        TrainStatCallback(args.skip_steps, ckpt_dir / "last.ckpt"),
    ]
    tensorboard = TensorBoardLogger(args.exp_dir, name="lightning_logs")
    loggers = [tensorboard, CSVLogger(args.exp_dir, name="lightning_logs", version=tensorboard.version)]
    trainer = pl.Trainer(
        default_root_dir=args.exp_dir, max_steps=args.max_updates, num_nodes=args.num_nodes or default_num_nodes(),
        accelerator=accelerator, devices=devices, strategy=strategy, use_distributed_sampler=False,
        callbacks=callbacks, logger=loggers, reload_dataloaders_every_n_epochs=1,
        check_val_every_n_epoch=None if args.val_check_interval else args.check_val_every_n_epoch,
        val_check_interval=args.val_check_interval, num_sanity_val_steps=args.num_sanity_val_steps,
        log_every_n_steps=args.log_every_n_steps,
    )
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
        optimizer_str=args.optimizer, use_autocast=args.use_autocast, save_1d_ckpt=args.save_1d_ckpt,
        num_workers=args.num_workers, seed=args.seed,
        loss_weights=(args.masked_weight, args.unmasked_weight, args.feature_weight),
        model_args=dict(args.model_arg), use_compile=args.compile,
    )
    return trainer, module


def run_train(args):
    trainer, module = build(args)
    trainer.fit(module, ckpt_path=args.resume_checkpoint)
    return trainer, module


def main(argv=None):
    return run_train(parse_args(argv))


if __name__ == "__main__":
    main()
