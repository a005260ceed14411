"""CTC fine-tuning of a pre-trained HuBERT (Lightning) on CPU, NVIDIA GPU or Habana HPU.

    # upstream's run: LibriLight-limited 10 h, validation on LibriSpeech dev-other, 8 GPUs
    python -m torch.distributed.run --nproc_per_node=8 finetune.py --dataset-path /data/hubert/ft \\
        --checkpoint exp_iter2/checkpoints_librispeech_hubert_pretrain_base/last.ckpt --gpus 8 --subset 10h
    # any LibriSpeech-layout folders with *.trans.txt (here the demo corpus, tiny model, CPU):
    python finetune.py --checkpoint exp_demo/iter2/.../last.ckpt --train-dir demo_data/LibriSpeech/train-clean-100 \\
        --valid-dir demo_data/LibriSpeech/dev-clean --accelerator cpu ...

--dataset-path is upstream's folder: the LibriLight-limited data (librispeech_finetuning/, as dataset_itr1.py
--librispeech_split librilight fetches it) and LibriSpeech's dev-other, anywhere below it. --checkpoint is a
train.py checkpoint (either conv layout) or an export.py --torchaudio file; --random-init fine-tunes a randomly
initialised --model-name instead (the baseline that pre-training must beat). --vocab FILE trains on tokens
(phones) listed in the transcripts instead of characters.
Checkpoints go to <exp-dir>/checkpoints_<model-name>/ (top 5 by val_loss and by train_loss, last.ckpt) and
keep upstream's keys (model.wav2vec2.*, aux.*) plus hubert_config and ctc_vocab; evaluate.py decodes them.
"""
import argparse
import logging
import time
from pathlib import Path

import utils.habana_env  # noqa: F401  (first: Habana's autocast op lists, set before torch loads)
import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.rank_zero import rank_zero_only

import train
from dataset import find_subset, librilight_folders
from health.callback import HealthCallback, SkipGuard
from lightning_finetune import HuBERTFineTuneModule
from model import FACTORIES, infer_arch
from utils.checkpoint import exit_if_done, load_checkpoint
from utils.ctc import VOCAB, read_vocab
from utils.callbacks import CheckpointKeeper, TrainStatCallback, progress_bars
from utils.device import PRECISIONS, configure_process, resolve_precision, set_hpu_autocast_lists
from utils.launch import cluster_environment, default_num_nodes
from utils.loggers import run_loggers
from utils.preemption import Preemption
from utils.versions import log_stack


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset-path", type=Path, default=None, help="folder with LibriLight-limited and LibriSpeech dev-other")
    a("--subset", choices=["10min", "1h", "10h"], default="10h", help="LibriLight-limited training subset")
    a("--train-dir", type=Path, action="append", default=None, metavar="DIR",
      help="transcribed LibriSpeech-layout training folder instead of LibriLight-limited (repeatable)")
    a("--valid-dir", type=Path, action="append", default=None, metavar="DIR",
      help="held-out folder instead of <dataset-path>'s dev-other (repeatable)")
    a("--checkpoint", type=Path, default=None, help="pre-trained checkpoint (train.py) or export.py --torchaudio file")
    a("--random-init", action="store_true", help="fine-tune a randomly initialised --model-name (a baseline)")
    a("--resume-checkpoint", type=Path, default=None, help="finetune.py checkpoint to resume from")
    a("--exp-dir", type=Path, default=Path("./exp_finetune"), help="checkpoints and logs go here")
    a("--model-name", default=None, choices=sorted(FACTORIES),
      help="architecture (default: the checkpoint's); names the checkpoint folder")
    a("--encoder-projection-dropout", type=float, default=0.0)
    a("--encoder-attention-dropout", type=float, default=0.0)
    a("--encoder-ff-interm-dropout", type=float, default=0.1)
    a("--encoder-dropout", type=float, default=0.0)
    a("--encoder-layer-drop", type=float, default=0.05)
    a("--mask-prob", type=float, default=0.65, help="time masking: about this share of frames (spans of mask_length)")
    a("--mask-channel-prob", type=float, default=0.5, help="channel masking probability")
    a("--mask-channel-length", type=int, default=64, help="channel mask span")
    a("--model-arg", type=train.parse_model_arg, action="append", default=[], metavar="NAME=VALUE",
      help="override any other model argument, e.g. mask_length=5 (repeatable)")
    a("--num-classes", type=int, default=500, help="pre-training classes (only for --random-init)")
    a("--vocab", type=Path, default=None, metavar="FILE",
      help="a token vocabulary (phones, say), one per line; transcripts list tokens separated by spaces "
           f"(default: the {len(VOCAB)}-token character vocabulary)")
    a("--aux-num-out", type=int, default=None, help="CTC outputs: the vocabulary's size (blank included)")
    a("--learning-rate", type=float, default=5e-5, help="peak learning rate")
    a("--betas", type=train.parse_betas, default=(0.9, 0.98), help="Adam betas, e.g. 0.9,0.98")
    a("--adam-eps", type=float, default=1e-8)
    a("--weight-decay", type=float, default=0.0)
    a("--clip-norm", type=float, default=5.0, help="global gradient-norm clip")
    a("--freeze-encoder-updates", type=int, default=10000, help="updates during which only the CTC head learns")
    a("--warmup-updates", type=int, default=2000)
    a("--hold-updates", type=int, default=8000)
    a("--decay-updates", type=int, default=10000)
    a("--max-updates", type=int, default=20000)
    a("--seconds-per-batch", type=float, default=200, help="audio seconds per device per batch")
    a("--val-check-interval", type=int, default=500, help="validate every N updates")
    a("--num-nodes", "--num_nodes", type=int, default=None, help="machines; default: from the launcher, else 1")
    a("--gpus", type=int, default=-1, help="NVIDIA GPUs per node (> -1 selects CUDA)")
    a("--hpus", type=int, default=-1, help="Habana HPUs per node (> -1 selects HPU)")
    a("--accelerator", default="cpu", choices=["cpu", "gpu", "hpu"], help="when neither --gpus nor --hpus")
    a("--devices", type=int, default=1, help="devices (processes) per node with --accelerator")
    a("--precision", choices=PRECISIONS, default="auto",
      help="as train.py: auto = bf16 autocast + TF32 on --gpus; on --hpus and CPU bf16 only with --autocast")
    a("--autocast", action="store_true", help="bf16 autocast (HPU: the recipe's op lists)")
    a("--save-top-k", type=int, default=5, help="best checkpoints kept by val_loss and by train_loss")
    a("--num-workers", type=int, default=10, help="data loader worker processes per device")
    a("--seed", type=int, default=1337)
    a("--max-skips-in-a-row", type=int, default=100,
      help="stop (exit status 1, final checkpoint written) after this many skipped updates in a row; 0: never")
    a("--log-every-n-steps", type=int, default=50)
    a("--debug", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.gpus > -1 and args.hpus > -1:
        p.error("use either --gpus or --hpus, not both")
    if (args.checkpoint is None) == (not args.random_init):
        p.error("give --checkpoint (a pre-trained model) or --random-init (a baseline), not both")
    if args.random_init and args.model_name is None:
        p.error("--random-init needs --model-name")
    if args.dataset_path is None and not (args.train_dir and args.valid_dir):
        p.error("give --dataset-path, or both --train-dir and --valid-dir")
    try:
        args.vocab = VOCAB if args.vocab is None else read_vocab(args.vocab)
    except (OSError, ValueError) as e:
        p.error(str(e))
    if args.aux_num_out not in (None, len(args.vocab)):
        p.error(f"--aux-num-out must be {len(args.vocab)}, the size of the vocabulary")
    try:
        resolve_precision(args.precision, train.accelerator_name(args), args.autocast)
    except ValueError as e:
        p.error(str(e))
    return args


def data_folders(args):
    """(training folders, validation folders) as strings."""
    train_dirs = args.train_dir or librilight_folders(args.dataset_path, args.subset)
    valid_dirs = args.valid_dir or [find_subset(args.dataset_path, "dev-other")]
    return [str(d) for d in train_dirs], [str(d) for d in valid_dirs]


def accelerator_and_strategy(args, num_nodes: int):
    """train.py's device choice. Fine-tuning always leaves parameters without gradients (the frozen-encoder
    updates, layer drop), so DDP must look for them."""
    as_train = argparse.Namespace(**vars(args), dist_dataset=1)
    return train.accelerator_and_strategy(as_train, num_nodes, find_unused_parameters=True)


class FineTuneStatCallback(TrainStatCallback):
    """train.py's timing, with a fine-tuning summary line."""

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        print(f"done: {trainer.global_step} updates in {(time.perf_counter() - self.fit_start) / 60:.1f} min; "
              f"train_loss {m.get('train_loss', float('nan')):.2f}, val_loss {m.get('val_loss', float('nan')):.2f}, "
              f"val CER {m.get('val_cer', float('nan')):.3f}, val WER {m.get('val_wer', float('nan')):.3f}, "
              f"skipped steps {pl_module.skipped_steps}")


def model_name_of(args, module) -> str:
    """--model-name, checked against the checkpoint's architecture, or that architecture's name."""
    try:
        found = infer_arch(module.model.state_dict())
    except ValueError:
        found = None
    if args.model_name is not None and found is not None and found != args.model_name:
        raise SystemExit(f"finetune.py: error: --model-name {args.model_name}, but {args.checkpoint} holds a "
                         f"{found} model")
    return args.model_name or found or "hubert_custom"


def build(args):
    """The Trainer and the LightningModule for these arguments (nothing runs yet)."""
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO)
    log_stack("finetune.py", rank_zero_info, rank_zero_only(logging.warning))
    for path in (args.checkpoint, args.resume_checkpoint):
        if path is not None:
            try:  # fail now, naming the file, rather than deep inside Lightning
                loaded = load_checkpoint(path)
            except (OSError, ValueError) as e:
                raise SystemExit(f"finetune.py: error: {e}")
            if path == args.resume_checkpoint:
                exit_if_done(path, loaded, args.max_updates)
    device = train.accelerator_name(args)
    precision = resolve_precision(args.precision, device, args.autocast)
    if precision.autocast and args.hpus > -1:  # before anything imports habana_frameworks: upstream's op lists
        set_hpu_autocast_lists(*(str(train.SCRIPT_DIR / f"ops_{kind}_hubert.txt") for kind in ("bf16", "fp32")))
    pl.seed_everything(args.seed, workers=True)
    try:
        train_folders, valid_folders = data_folders(args)
    except (OSError, ValueError) as e:
        raise SystemExit(f"finetune.py: error: {e}")
    overrides = dict(encoder_projection_dropout=args.encoder_projection_dropout,
                     encoder_attention_dropout=args.encoder_attention_dropout,
                     encoder_ff_interm_dropout=args.encoder_ff_interm_dropout, encoder_dropout=args.encoder_dropout,
                     encoder_layer_drop=args.encoder_layer_drop, mask_prob=args.mask_prob,
                     mask_channel_prob=args.mask_channel_prob, mask_channel_length=args.mask_channel_length,
                     **dict(args.model_arg))
    if args.random_init:
        overrides["num_classes"] = args.num_classes
    module = HuBERTFineTuneModule(
        checkpoint=None if args.checkpoint is None else str(args.checkpoint), model_name=args.model_name,
        model_overrides=overrides, train_folders=train_folders, valid_folders=valid_folders,
        seconds_per_batch=args.seconds_per_batch, learning_rate=args.learning_rate, betas=args.betas,
        eps=args.adam_eps, weight_decay=args.weight_decay, clip_norm=args.clip_norm,
        freeze_encoder_updates=args.freeze_encoder_updates, warmup_updates=args.warmup_updates,
        hold_updates=args.hold_updates, decay_updates=args.decay_updates, num_workers=args.num_workers,
        seed=args.seed, use_autocast=precision.autocast, vocab=args.vocab)
    num_nodes = args.num_nodes or default_num_nodes()
    accelerator, devices, strategy = accelerator_and_strategy(args, num_nodes)
    configure_process(precision, device)
    ckpt_dir = args.exp_dir / f"checkpoints_{model_name_of(args, module)}"
    callbacks = [CheckpointKeeper(ckpt_dir, args.save_top_k), FineTuneStatCallback(1), HealthCallback(args.exp_dir),
                 SkipGuard(args.max_skips_in_a_row), Preemption(), *progress_bars()]
    loggers = run_loggers(args.exp_dir)
    trainer = pl.Trainer(
        default_root_dir=args.exp_dir, max_steps=args.max_updates, num_nodes=num_nodes, accelerator=accelerator,
        devices=devices, strategy=strategy, use_distributed_sampler=False, plugins=[cluster_environment()],
        callbacks=callbacks, logger=loggers,
        enable_checkpointing=False, reload_dataloaders_every_n_epochs=1, check_val_every_n_epoch=None,
        val_check_interval=args.val_check_interval, num_sanity_val_steps=0, log_every_n_steps=args.log_every_n_steps,
    )
    if trainer.is_global_zero:
        source = "random init" if args.random_init else str(args.checkpoint)
        print(f"fine-tuning {ckpt_dir.name[len('checkpoints_'):]} from {source}: {len(train_folders)} training "
              f"folder(s), {len(valid_folders)} validation folder(s), "
              f"{precision.describe(device)} on {device}")
    return trainer, module


def main(argv=None):
    args = parse_args(argv)
    trainer, module = build(args)
    train.fit(trainer, module, args.resume_checkpoint, "finetune.py")
    return trainer, module


if __name__ == "__main__":
    main()
