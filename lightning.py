"""The HuBERT pre-training LightningModule (spec §8): manual optimisation, global masked-frame loss
normalisation, gradient accumulation, clipping, metrics reduced across ranks, and resumable data."""
from pathlib import Path
from typing import List, Optional, Tuple

import pytorch_lightning as pl
import torch
from torch import Tensor

from dataset import (BucketizeBatchSampler, CollateFnHubert, DistributedBatchSampler, HuBERTDataSet, UpdateBatch,
                     UpdateLoader, format_stats, loader_stats)
from loss import compute_accuracy, compute_accuracy_static, hubert_loss, hubert_loss_static
from model import FACTORIES, convert_conv_layout, convert_optimizer_state, convert_weight_norm
from utils.checkpoint import align_logging_step, align_loop_state, predates_resumable_data
from utils.device import (clip_grad_norm, draws_before_forward, hpu_graph_breaks, make_optimizer,
                          portable_optimizer_state)
from utils.lr_schedule import LinearDecayLRScheduler

SAMPLE_RATE = 16000
MIN_LEN, MAX_LEN = 32000, 250000  # 2 s to 15.6 s, train and valid (spec §4.6)
# Per-stage sums, in this order; the train row is reduced across ranks every step (one all_gather).
STATS = ("loss", "masked", "masked_correct", "unmasked", "unmasked_correct")


class HuBERTPreTrainModule(pl.LightningModule):
    """Pre-training of ``model_name`` on ``dataset_path`` (``<exp>/data/<feat>/`` from preprocess.py).

    One training batch is one optimizer update: an :class:`UpdateBatch` of ``accum_steps`` micro-batches
    (fewer at the end of an epoch, as Habana stepped at the epoch's last batch). Each micro-batch's loss is
    scaled by ``world_size / (masked frames of all ranks)`` before backward, so after DDP's gradient average
    the update is the per-masked-frame gradient of the global batch; the micro-batch gradients are averaged
    (each scaled by ``1 / group size``), so 2 x 175 s equals 1 x 350 s (Habana's recipe summed them), and DDP
    all-reduces only after the last one. An update with a non-finite loss on any rank, or a non-finite
    gradient norm, is skipped on every rank (after its whole window, so DDP stays in step) and counted.
    Randomness (masks, dropout, layer drop) is seeded per (seed, step, micro-batch, rank) and crops per (seed,
    epoch, update, micro-batch, rank); the train loader resumes mid-epoch, so a run resumed from any checkpoint
    trains as an uninterrupted one. The datasets are built once; each epoch only re-plans the batches.
    """

    def __init__(self, *, model_name: str, feature_grad_mult: Optional[float], num_classes: int, dataset: str,
                 dataset_path: str, feature_type: str, seconds_per_batch: float, learning_rate: float,
                 betas: Tuple[float, float], eps: float, weight_decay: float, clip_norm: Optional[float],
                 warmup_updates: int, max_updates: int, static_logit_generator: bool = False,
                 static_indexing: bool = False, static_layerdrop: bool = False, align_buckets: str = "none",
                 num_buckets: int = 1000, accum_steps: int = 1, use_conv2d: bool = False,
                 use_instancenorm: bool = False, all_deterministic: bool = False,
                 show_traindataloader_stats: bool = False, no_layerdrop: bool = False, use_fused_clip: bool = False,
                 use_max_sub_softmax_opt: bool = False, recompilation_optimization: bool = False,
                 split_logits: bool = False, optimizer_str: str = "adamw", use_autocast: bool = False,
                 save_1d_ckpt: bool = False, num_workers: int = 10, seed: int = 1337,
                 loss_weights: Tuple[float, float, float] = (1.0, 0.0, 10.0), model_args: Optional[dict] = None,
                 use_compile: bool = False, compile_backend: str = "inductor", legacy_weight_norm: bool = False):
        super().__init__()
        self.save_hyperparameters()
        flags = dict(use_conv2d=use_conv2d, use_instancenorm=use_instancenorm, static_indexing=static_indexing,
                     static_layerdrop=static_layerdrop, static_logit_generator=static_logit_generator,
                     split_logits=split_logits, use_max_sub_softmax_opt=use_max_sub_softmax_opt,
                     no_layerdrop=no_layerdrop, all_deterministic=all_deterministic)
        if model_name in ("hubert_pretrain_base", "hubert_pretrain_tiny"):
            flags["feature_grad_mult"] = feature_grad_mult  # Large and X-Large keep theirs (None), as upstream
        # model_args: any hubert_pretrain_model argument, over the factory's and the flags'
        self.model = FACTORIES[model_name](**{"num_classes": num_classes, **flags, **(model_args or {})})
        transformer = self.model.wav2vec2.encoder.transformer
        if recompilation_optimization and static_layerdrop and transformer.layer_drop > 0:
            # Habana's HPU graph break before the first layer and after each layer's where (spec §6.8; after
            # the final layer norm of a pre-LN model), so each layer's graph is the same whatever is dropped.
            hpu_graph_breaks(before=transformer.layers, after=[transformer])
        # torch.compile'd forward, kept out of the module tree so checkpoints keep the plain parameter names.
        # Every bucket shape compiles once; torch's default limit (8) would send the rest back to eager.
        if use_compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        forward = torch.compile(self.model, backend=compile_backend) if use_compile else self.model
        object.__setattr__(self, "_forward", forward)
        masked, unmasked, feature = loss_weights
        self.loss_weights = dict(masked_weight=masked, unmasked_weight=unmasked, feature_weight=feature)
        self.automatic_optimization = False
        self.static = static_logit_generator
        self.stats = {"train": torch.zeros(len(STATS)), "val": torch.zeros(len(STATS))}
        self.skipped_steps = 0
        self._datasets = {}
        self._loaders = {}
        self._resume_without_data_position = False

    # ---- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        opt = make_optimizer(h.optimizer_str, self.model.parameters(), h.learning_rate, tuple(h.betas), h.eps,
                             h.weight_decay, self.device.type)
        sched = LinearDecayLRScheduler(opt, h.warmup_updates, h.max_updates)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def _step(self, batch, num_samples: List[int]) -> Tuple[Tensor, Tensor]:
        """Loss (summed over masked frames) and this batch's row of STATS."""
        waveforms, labels, lengths = batch
        draws = self.model.draw(num_samples) if draws_before_forward(self.device) else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.hparams.use_autocast):
            out = self._forward(waveforms, labels, lengths, draws)
        # The loss outside autocast, from fp32 logits and penalty: Habana's op lists would sum it in bf16.
        if self.static:
            logits, mask_m, mask_u, pen = out
            loss = hubert_loss_static(logits, mask_m, mask_u, pen, **self.loss_weights)
            with torch.no_grad():
                correct_m, count_m = compute_accuracy_static(logits, mask_m)
                correct_u, count_u = compute_accuracy_static(logits, mask_u)
        else:
            logit_m, logit_u, pen = out
            loss = hubert_loss(logit_m, logit_u, pen, **self.loss_weights)
            with torch.no_grad():
                correct_m, count_m = compute_accuracy(logit_m)
                correct_u, count_u = compute_accuracy(logit_u)
        row = torch.stack([loss.detach(), count_m, correct_m, count_u, correct_u]).float()
        return loss, row

    def training_step(self, batch: UpdateBatch, batch_idx):
        if (batch.epoch, batch.position) != (self.current_epoch, batch_idx):
            raise RuntimeError(f"the loader is at epoch {batch.epoch} update {batch.position}, the training loop at "
                               f"epoch {self.current_epoch} update {batch_idx}: the data would not resume exactly")
        opt = self.optimizers()
        totals = self._accumulate(batch, opt)
        stepped = totals is not None and self._optimizer_step(opt)
        opt.zero_grad(set_to_none=True)
        self._loaders["train"].consumed(batch)  # a checkpoint from now on resumes after this update
        if not stepped:
            self.skipped_steps += 1
            self.log("skipped_steps", float(self.skipped_steps))
            return None
        self._log_train(totals)
        return totals[0] / totals[1]

    def _accumulate(self, update: UpdateBatch, opt) -> Optional[Tensor]:
        """Forward and backward of every micro-batch; their STATS row, summed over micro-batches and ranks, or
        None when some rank's loss was not finite (every rank knows it: the update is skipped). The window runs
        to its end even then, its gradients dropped with the update: stopped early, it left DDP's reducer the
        parameters used by a backward already run under no_sync, and a later synced backward in which one of
        them was dropped (layer drop) failed with "gradient which is undefined, but still allreduced"."""
        h = self.hparams
        totals, finite = [], True
        for micro, (micro_batch, num_samples) in enumerate(zip(update.micro_batches, update.num_samples)):
            torch.manual_seed(hash((h.seed, self.global_step, micro, self.global_rank)) & 0xFFFF_FFFF)
            last = micro == len(update.micro_batches) - 1
            with opt.toggle_model(sync_grad=last):  # DDP all-reduces after the last
                loss, row = self._step(micro_batch, num_samples)
                local = torch.cat([row, torch.isfinite(loss.detach()).float()[None]])
                gathered = self.all_gather(local).reshape(-1, len(local))  # (world_size, ...)
                total = gathered.sum(0)
                finite = finite and bool(total[-1] == len(gathered))
                self.manual_backward(loss * len(gathered) / total[1] / len(update.micro_batches))
            totals.append(total)
        return torch.stack(totals).sum(0) if finite else None

    def _optimizer_step(self, opt) -> bool:
        """Clip, step the optimizer and the LR schedule; no step (False) if the gradient norm is not finite
        (it is computed from the all-reduced gradients, so every rank decides alike)."""
        h = self.hparams
        if h.clip_norm is not None:
            grad_norm = clip_grad_norm(self.model.parameters(), h.clip_norm, h.use_fused_clip, self.device.type)
            self.log("grad_norm", grad_norm)
            if not torch.isfinite(grad_norm):
                return False
        self.log("lr", opt.param_groups[0]["lr"])
        opt.step()
        self.lr_schedulers().step()
        return True

    def _log_train(self, total: Tensor) -> None:
        """Per-step loss, epoch-to-date loss and accuracies (all global)."""
        self.stats["train"] = self.stats["train"].to(total) + total[: len(STATS)]
        loss, masked, masked_correct, unmasked, unmasked_correct = self.stats["train"]
        self.log("train_loss_step", total[0] / total[1])
        self.log("train_loss", loss / masked, prog_bar=True)
        self.log("train_masked_accuracy", masked_correct / masked, prog_bar=True)
        self.log("train_unmasked_accuracy", unmasked_correct / unmasked.clamp_min(1))

    def on_train_epoch_start(self):
        self.stats["train"].zero_()

    def on_train_batch_start(self, batch, batch_idx):
        align_logging_step(self.trainer, self.skipped_steps)

    # ---- validation ---------------------------------------------------------------------------------
    def validation_step(self, batch: UpdateBatch, batch_idx):
        # The same masks (and crops) at every validation: val_loss moves only with the model.
        torch.manual_seed(hash((self.hparams.seed, -1, batch.position, self.global_rank)) & 0xFFFF_FFFF)
        _, row = self._step(batch.micro_batches[0], batch.num_samples[0])
        self.stats["val"] = self.stats["val"].to(row) + torch.where(torch.isfinite(row[0]), row, 0.0)
        return row[0]

    def on_validation_epoch_start(self):
        self.stats["val"].zero_()

    def on_validation_epoch_end(self):
        total = self.trainer.strategy.reduce(self.stats["val"].to(self.device), reduce_op="sum")
        loss, masked, masked_correct, unmasked, unmasked_correct = total
        # Already global: sync_dist only keeps Lightning's epoch-level bookkeeping consistent across ranks.
        self.log("val_loss", loss / masked, sync_dist=True)
        self.log("val_masked_accuracy", masked_correct / masked, sync_dist=True)
        self.log("val_unmasked_accuracy", unmasked_correct / unmasked.clamp_min(1), sync_dist=True)

    # ---- data -----------------------------------------------------------------------------------------
    def _loader(self, subset: str, train: bool) -> UpdateLoader:
        """Built once per run (the dataset reads and checks the TSV and the label file). Lightning asks for the
        loaders every epoch (``reload_dataloaders_every_n_epochs=1``) because reshuffled packing changes the
        train epoch's length; it gets the same loader, and its persistent workers, with the next epoch planned."""
        if subset in self._loaders:
            return self._loaders[subset]
        h = self.hparams
        dataset = HuBERTDataSet(h.dataset_path, h.dataset, subset, feature_type=h.feature_type,
                                num_classes=h.num_classes)
        align = h.align_buckets if train else "none"
        sampler = BucketizeBatchSampler(
            dataset.len_list, num_buckets=h.num_buckets if train else 1000, min_len=MIN_LEN, max_len=MAX_LEN,
            max_token_count=int(h.seconds_per_batch * SAMPLE_RATE), shuffle=train, align_buckets=align,
            seed=h.seed)
        aligner = sampler.gen_bucket_boundary_fn() if align != "none" else None
        if train and h.show_traindataloader_stats and self.global_rank == 0:
            print(format_stats(loader_stats(sampler, dataset.len_list, pad=align != "none", aligner=aligner)))
        batches = DistributedBatchSampler(sampler, num_replicas=self.trainer.world_size, rank=self.global_rank,
                                          shuffle=train and not h.all_deterministic, seed=h.seed)
        collate = CollateFnHubert(h.feature_type, pad=align != "none", rand_crop=True, aligner=aligner)
        loader = UpdateLoader(dataset, batches, collate, accumulate=h.accum_steps if train else 1, seed=h.seed,
                              rank=self.global_rank, num_workers=h.num_workers,
                              pin_memory=self.device.type == "cuda")
        self._datasets[subset], self._loaders[subset] = dataset, loader
        return loader

    def train_dataloader(self) -> UpdateLoader:
        loader = self._loader("train", train=True)
        loader.start_epoch(self.current_epoch)
        if self._resume_without_data_position:
            self._resume_without_data_position = False
            loader.resume_without_state(self.trainer.fit_loop.epoch_loop.batch_progress.current.completed)
        return loader

    def val_dataloader(self) -> UpdateLoader:
        return self._loader("valid", train=False)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _param_names(self):
        return [name for name, _ in self.model.named_parameters()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the model config (the checkpoint rebuilds its model alone); ``save_1d_ckpt`` writes the
        conv weights and their Adam moments in the conv1d layout, ``legacy_weight_norm`` torchaudio 2.0's
        weight-norm names (the live state is not touched)."""
        checkpoint["hubert_config"] = self.model.config
        checkpoint["skipped_steps"] = self.skipped_steps
        if self.hparams.save_1d_ckpt:
            checkpoint["state_dict"] = convert_conv_layout(checkpoint["state_dict"], use_conv2d=False)
            checkpoint["optimizer_states"] = [convert_optimizer_state(s, self._param_names(), use_conv2d=False)
                                              for s in checkpoint["optimizer_states"]]
        if self.hparams.legacy_weight_norm:
            checkpoint["state_dict"] = convert_weight_norm(checkpoint["state_dict"], legacy=True)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Any conv layout, either weight-norm naming and either AdamW's state (torch's, Habana's FusedAdamW)
        resumes any run: convert to this run's."""
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        self._resume_without_data_position = predates_resumable_data(checkpoint)
        align_loop_state(checkpoint)  # before Lightning restores its loops from it
        use_conv2d = self.hparams.use_conv2d
        state_dict = convert_weight_norm(checkpoint["state_dict"], legacy=False)
        checkpoint["state_dict"] = convert_conv_layout(state_dict, use_conv2d)
        like = self._optimizer_like()
        checkpoint["optimizer_states"] = [
            portable_optimizer_state(convert_optimizer_state(s, self._param_names(), use_conv2d), like)
            for s in checkpoint.get("optimizer_states", [])]

    def _optimizer_like(self) -> torch.optim.Optimizer:
        """An optimizer of the kind configure_optimizers builds (on one stand-in parameter): the layout and
        settings a resumed state must have, whichever AdamW wrote it."""
        h = self.hparams
        return make_optimizer(h.optimizer_str, [torch.nn.Parameter(torch.zeros(1))], h.learning_rate,
                              tuple(h.betas), h.eps, h.weight_decay, self.trainer.strategy.root_device.type)


def checkpoint_dir(exp_dir: Path, dataset: str, model_name: str) -> Path:
    return Path(exp_dir) / f"checkpoints_{dataset}_{model_name}"
