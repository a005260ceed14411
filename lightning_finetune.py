"""The CTC fine-tuning LightningModule (spec §11.1, upstream's ``HuBERTFineTuneModule``): a pre-trained HuBERT
plus a linear CTC head (``aux``) over characters, manual optimisation, loss normalised by the global batch
size, greedy CER/WER at validation."""
from typing import List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from dataset import (BucketizeBatchSampler, DistributedBatchSampler, TranscribedAudio, UpdateBatch, UpdateLoader,
                     collate_ctc, list_utterances)
from model import FACTORIES, Draws
from model.components import get_padding_mask
from utils.checkpoint import align_logging_step, align_loop_state, load_pretrained_model, predates_resumable_data
from utils.ctc import VOCAB, ErrorCounts, greedy_decode, ids_to_text
from utils.device import clip_grad_norm, draws_before_forward, make_optimizer, reduce_dtype
from utils.lr_schedule import TriStageLRScheduler

SAMPLE_RATE = 16000
# Per-stage sums, reduced across ranks: summed CTC loss, utterances, then ErrorCounts' four fields.
STATS = ("loss", "utterances", "char_errors", "chars", "word_errors", "words")


def build_model(checkpoint: Optional[str], model_name: Optional[str], overrides: dict):
    """The pre-trained model of ``checkpoint`` (any conv layout, or a torchaudio export), or a randomly
    initialised ``model_name``, with the fine-tuning ``overrides`` (dropouts, masking, layer drop), in the
    conv1d layout that torchaudio and HF share."""
    overrides = {**overrides, "use_conv2d": False, "use_instancenorm": False}
    if checkpoint is None:
        return FACTORIES[model_name](**overrides)
    return load_pretrained_model(checkpoint, **overrides)


class HuBERTFineTuneModule(pl.LightningModule):
    """CTC fine-tuning of a HuBERT encoder on transcribed audio folders.

    The CNN feature extractor stays frozen; for the first ``freeze_encoder_updates`` updates the transformer is
    frozen too, so only the CTC head learns. Time and channel masking apply in training only (upstream also
    masked during validation). Each batch's summed CTC loss is scaled by ``world_size / (utterances of all
    ranks)`` before backward, so after DDP's average the update is the per-utterance gradient of the global
    batch. Randomness is seeded per (seed, step, rank) and the train loader resumes mid-epoch (train.py's
    UpdateLoader, one batch per update), so a run resumed from any checkpoint trains as an uninterrupted one.
    A step whose loss is not finite on any rank is skipped on every rank.
    """

    def __init__(self, *, checkpoint: Optional[str], model_name: Optional[str], model_overrides: dict,
                 train_folders: Sequence[str], valid_folders: Sequence[str], seconds_per_batch: float,
                 learning_rate: float, betas: Tuple[float, float], eps: float, weight_decay: float,
                 clip_norm: float, freeze_encoder_updates: int, warmup_updates: int, hold_updates: int,
                 decay_updates: int, num_workers: int = 10, seed: int = 1337, use_autocast: bool = False,
                 vocab: Sequence[str] = VOCAB):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(checkpoint, model_name, model_overrides)
        self.aux = nn.Linear(self.model.config["encoder_embed_dim"], len(vocab))  # upstream: 768 for every size
        for p in self.model.wav2vec2.feature_extractor.parameters():
            p.requires_grad = False
        self.ctc_loss = nn.CTCLoss(blank=0, reduction="sum", zero_infinity=True)
        self.automatic_optimization = False
        self.datasets = {}
        self._loaders = {}
        self._resume_without_data_position = False
        self.stats = {"train": torch.zeros(len(STATS), dtype=torch.float64),
                      "val": torch.zeros(len(STATS), dtype=torch.float64)}
        self.skipped_steps = 0

    def setup(self, stage: str) -> None:
        """List the utterances once per run (their headers are checked here, before any training)."""
        if self.datasets:
            return
        h = self.hparams
        self.datasets = {"train": TranscribedAudio(list_utterances(h.train_folders, vocab=h.vocab), h.vocab),
                         "val": TranscribedAudio(list_utterances(h.valid_folders, vocab=h.vocab), h.vocab)}
        for stage, dataset in self.datasets.items():
            longest = int(dataset.lengths.argmax())
            if dataset.lengths[longest] > h.seconds_per_batch * SAMPLE_RATE:
                raise ValueError(f"--seconds-per-batch {h.seconds_per_batch} cannot hold the longest {stage} "
                                 f"utterance, {dataset.utterances[longest].path} "
                                 f"({dataset.lengths[longest] / SAMPLE_RATE:.1f} s)")

    # ---- the model ------------------------------------------------------------------------------------
    def encoder_frozen(self) -> bool:
        return self.global_step < self.hparams.freeze_encoder_updates

    def forward(self, waveforms: Tensor, lengths: Tensor, draws: Optional[Draws] = None) -> Tuple[Tensor, Tensor]:
        """Log-probabilities ``(T, B, V)`` in float32 and frame lengths ``(B,)``; masks and layer drops from
        ``draws`` (``self.model.draw``) if given, else drawn as they come."""
        wav2vec2 = self.model.wav2vec2
        with torch.no_grad():
            x, out_len = wav2vec2.feature_extractor(waveforms, lengths)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen()):
            padding_mask = get_padding_mask(x, out_len)
            x, attention_mask = wav2vec2.encoder._preprocess(x, out_len)
            if self.training:
                x, _ = self.model.mask_generator(x, padding_mask, None if draws is None else (draws.mask, draws.channels))
            x = wav2vec2.encoder.transformer(x, attention_mask, None if draws is None else draws.dropped)
        logits = self.aux(x)
        return nn.functional.log_softmax(logits.float(), dim=-1).transpose(0, 1), out_len

    def _step(self, batch, num_samples: Optional[List[int]] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """(summed CTC loss, log-probabilities, frame lengths); ``num_samples``: the audio lengths on the host."""
        waveforms, labels, lengths, label_lengths = batch
        draws = None
        if self.training and num_samples is not None and draws_before_forward(self.device):
            draws = self.model.draw(num_samples)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.hparams.use_autocast):
            log_probs, out_len = self(waveforms, lengths, draws)
        return self.ctc_loss(log_probs, labels, out_len, label_lengths), log_probs, out_len

    # ---- optimisation ---------------------------------------------------------------------------------
    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        h = self.hparams
        opt = make_optimizer("adamw", self.trainable_parameters(), h.learning_rate, tuple(h.betas), h.eps,
                             h.weight_decay, self.device.type)
        sched = TriStageLRScheduler(opt, h.warmup_updates, h.hold_updates, h.decay_updates)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def training_step(self, update: UpdateBatch, batch_idx):
        h = self.hparams
        torch.manual_seed(hash((h.seed, self.global_step, self.global_rank)) & 0xFFFF_FFFF)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        batch = update.micro_batches[0]
        loss, _, _ = self._step(batch, update.num_samples[0])
        local = torch.stack([loss.detach().float(), torch.full((), float(len(batch[0])), device=self.device),
                             torch.isfinite(loss.detach()).float()])  # a fill, not a host-to-device copy
        gathered = self.all_gather(local).reshape(-1, len(local))  # (world_size, 3)
        total = gathered.sum(0)
        self._loaders["train"].consumed(update)  # a checkpoint from now on resumes after this batch
        if total[2] < len(gathered):  # some rank's loss is inf/NaN: every rank skips this batch
            self.skipped_steps += 1
            self.log("skipped_steps", float(self.skipped_steps))
            return None
        self.manual_backward(loss * len(gathered) / total[1])
        self.log("grad_norm", clip_grad_norm(self.trainable_parameters(), h.clip_norm, False, self.device.type))
        self.log("lr", opt.param_groups[0]["lr"])
        self.log("encoder_frozen", float(self.encoder_frozen()))
        opt.step()
        self.lr_schedulers().step()
        self._log_train(total)
        return loss.detach()

    def _log_train(self, total: Tensor) -> None:
        self.stats["train"][:2] += total[:2].cpu().double()  # float64 on the host only (HPU: not verified)
        loss, utterances = self.stats["train"][:2]
        self.log("train_loss_step", float(total[0] / total[1]))
        self.log("train_loss", float(loss / utterances), prog_bar=True)

    def on_train_epoch_start(self):
        self.stats["train"].zero_()

    def on_train_batch_start(self, batch, batch_idx):
        align_logging_step(self.trainer, self.skipped_steps)

    # ---- validation -----------------------------------------------------------------------------------
    def validation_step(self, update: UpdateBatch, batch_idx):
        batch = update.micro_batches[0]
        loss, log_probs, out_len = self._step(batch)
        # To the host once per batch, not three times per utterance.
        labels, label_lengths, out_len, log_probs = (t.cpu() for t in (batch[1], batch[3], out_len, log_probs))
        counts = ErrorCounts()
        for i in range(len(labels)):
            reference = ids_to_text(labels[i, :label_lengths[i]].tolist(), self.hparams.vocab)
            counts.add(reference, greedy_decode(log_probs[:, i], int(out_len[i]), self.hparams.vocab))
        loss = loss.detach().cpu().double()
        row = torch.tensor([loss if torch.isfinite(loss) else 0.0, len(labels), counts.char_errors, counts.chars,
                            counts.word_errors, counts.words], dtype=torch.float64)
        self.stats["val"] += row
        return loss

    def on_validation_epoch_start(self):
        self.stats["val"].zero_()

    def on_validation_epoch_end(self):
        total = self.trainer.strategy.reduce(self.stats["val"].to(self.device, reduce_dtype(self.device)),
                                             reduce_op="sum")
        loss, utterances, char_errors, chars, word_errors, words = total.tolist()
        # Already global: sync_dist only keeps Lightning's epoch-level bookkeeping consistent across ranks.
        self.log("val_loss", loss / max(utterances, 1), sync_dist=True)
        self.log("val_cer", char_errors / max(chars, 1), sync_dist=True, prog_bar=True)
        self.log("val_wer", word_errors / max(words, 1), sync_dist=True)

    # ---- data -----------------------------------------------------------------------------------------
    def _loader(self, stage: str) -> UpdateLoader:
        """Built once per run; Lightning asks every epoch and gets it back with the next epoch planned."""
        if stage in self._loaders:
            return self._loaders[stage]
        h, train = self.hparams, stage == "train"
        sampler = BucketizeBatchSampler(self.datasets[stage].lengths, num_buckets=100,
                                        max_token_count=int(h.seconds_per_batch * SAMPLE_RATE), shuffle=train,
                                        seed=h.seed)
        batches = DistributedBatchSampler(sampler, num_replicas=self.trainer.world_size, rank=self.global_rank,
                                          shuffle=train, seed=h.seed)
        self._loaders[stage] = UpdateLoader(self.datasets[stage], batches, collate_ctc, accumulate=1, seed=h.seed,
                                            rank=self.global_rank, num_workers=h.num_workers,
                                            pin_memory=self.device.type == "cuda")
        return self._loaders[stage]

    def train_dataloader(self) -> UpdateLoader:
        loader = self._loader("train")
        loader.start_epoch(self.current_epoch)
        if self._resume_without_data_position:
            self._resume_without_data_position = False
            loader.resume_without_state(self.trainer.fit_loop.epoch_loop.batch_progress.current.completed)
        return loader

    def val_dataloader(self) -> UpdateLoader:
        return self._loader("val")

    # ---- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The model config and the vocabulary travel with the weights (evaluate.py and export.py need both)."""
        checkpoint["hubert_config"] = self.model.config
        checkpoint["ctc_vocab"] = list(self.hparams.vocab)
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, ours = checkpoint.get("ctc_vocab", list(VOCAB)), list(self.hparams.vocab)
        if saved != ours:  # before Lightning loads the weights, whose CTC head would not fit
            raise ValueError(f"the checkpoint was fine-tuned on the vocabulary {saved}, not on this run's {ours} "
                             "(--vocab)")
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        self._resume_without_data_position = predates_resumable_data(checkpoint)
        align_loop_state(checkpoint)  # before Lightning restores its loops from it
