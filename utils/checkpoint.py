"""Reading checkpoint files: Lightning checkpoints written by train.py and finetune.py, plain state dicts (ours
or torchaudio's), and export.py's torchaudio files, in the conv1d or conv2d layout."""
import pickle
import zipfile
from pathlib import Path
from typing import Tuple

import torch
from torch import nn

from model import (FACTORIES, HuBERTPretrainModel, Wav2Vec2Model, convert_conv_layout, model_from_state_dict,
                   strip_prefix)
from utils.ctc import VOCAB


def load_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load`` with ``weights_only=True``, and an error naming the file when it is missing,
    truncated, corrupt or not a checkpoint. torch does not check the CRC32 its zip format stores for every
    tensor: a checkpoint with bytes overwritten in the middle loaded and trained on; they are checked here
    (at ~2 GB/s, a small part of loading)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            bad = str(e)
        if bad is not None:
            raise ValueError(f"checkpoint {path} is corrupt: {bad} does not match its CRC-32 (a damaged copy or "
                             "disk; use an earlier checkpoint)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"checkpoint {path} is truncated or not a PyTorch checkpoint: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return obj


def is_torchaudio_export(obj: dict) -> bool:
    """export.py --torchaudio: ``{"state_dict": wav2vec2_model weights, "config": wav2vec2_model arguments}``."""
    return "config" in obj and "feature_extractor.conv_layers.0.conv.weight" in obj.get("state_dict", {})


def split_checkpoint(obj: dict) -> Tuple[dict, dict]:
    """(model state dict without the ``model.`` prefix, model config or None) of a loaded checkpoint."""
    if "state_dict" in obj:
        return strip_prefix(obj["state_dict"]), obj.get("hubert_config")
    return strip_prefix(obj), None


def model_from_export(obj: dict, **overrides) -> HuBERTPretrainModel:
    """A pre-training model whose encoder is a torchaudio export's (any ``aux`` head is left out). The export has
    no mask embedding or label embeddings (torchaudio's encoder has neither), so those start afresh."""
    config = {k: v for k, v in obj["config"].items() if k != "aux_num_out"}
    # Base's factory supplies the masking and logit settings; every architecture argument comes from the export.
    model = FACTORIES["hubert_pretrain_base"](**{**config, **overrides})
    encoder = {k: v for k, v in obj["state_dict"].items() if not k.startswith("aux.")}
    model.wav2vec2.load_state_dict(convert_conv_layout(encoder, model.config["use_conv2d"]), strict=False)
    missing = set(model.wav2vec2.state_dict()) - set(encoder) - {"aux.weight", "aux.bias"}
    if missing:
        raise KeyError(f"the export lacks {sorted(missing)[:3]}")
    return model


def pretrained_model(obj: dict, source, **overrides) -> HuBERTPretrainModel:
    """The model of a loaded checkpoint ``obj`` (read from ``source``), rebuilt with its saved config (or the
    architecture inferred from its shapes, or a torchaudio export's config); ``overrides`` replace model
    arguments, e.g. ``use_conv2d=False``. A fine-tuning checkpoint gives its encoder (not its CTC head)."""
    try:
        if is_torchaudio_export(obj):
            return model_from_export(obj, **overrides)
        state_dict, config = split_checkpoint(obj)
        return model_from_state_dict(state_dict, config, **overrides)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"checkpoint {source} does not hold a HuBERT pre-training model: {e}") from e


def load_pretrained_model(path, map_location="cpu", **overrides) -> HuBERTPretrainModel:
    """``pretrained_model`` of a checkpoint file."""
    return pretrained_model(load_checkpoint(path, map_location), path, **overrides)


def has_ctc_head(obj: dict) -> bool:
    return "aux.weight" in obj.get("state_dict", obj)


def finetuned_model(obj: dict, source) -> Tuple[HuBERTPretrainModel, Tuple[str, ...]]:
    """(model whose ``wav2vec2`` carries the CTC head as ``aux``, in the conv1d layout; the CTC vocabulary) of a
    loaded finetune.py checkpoint or export.py --torchaudio file of one. Checkpoints without a vocabulary
    (upstream's) use torchaudio's 29 characters."""
    if not has_ctc_head(obj):
        raise ValueError(f"checkpoint {source} has no CTC head (aux.weight): fine-tune it with finetune.py first")
    state_dict = obj.get("state_dict", obj)
    weight, bias = state_dict["aux.weight"], state_dict["aux.bias"]
    vocab = tuple(obj.get("ctc_vocab", obj.get("labels", VOCAB)))
    if len(vocab) != weight.shape[0]:
        raise ValueError(f"checkpoint {source}: the CTC head has {weight.shape[0]} outputs but the vocabulary "
                         f"{len(vocab)} tokens")
    model = pretrained_model(obj, source, use_conv2d=False, use_instancenorm=False)
    model.wav2vec2.aux = nn.Linear(weight.shape[1], weight.shape[0])
    model.wav2vec2.aux.load_state_dict({"weight": weight, "bias": bias})
    return model, vocab


def load_finetuned_model(path, map_location="cpu") -> Tuple[Wav2Vec2Model, Tuple[str, ...]]:
    """(encoder with its CTC head, vocabulary) of a fine-tuned checkpoint file: what evaluate.py decodes with."""
    model, vocab = finetuned_model(load_checkpoint(path, map_location), path)
    return model.wav2vec2, vocab


def exit_if_done(path, checkpoint: dict, max_updates: int) -> None:
    """Resuming a run that already reached ``--max-updates`` says so and exits 0 (Lightning would start, stop
    at once and write one more checkpoint)."""
    step = checkpoint.get("global_step", 0)
    if step >= max_updates:
        print(f"{path} is at update {step} and --max-updates is {max_updates}: the run is already done "
              "(a larger --max-updates extends it)")
        raise SystemExit(0)


def align_loop_state(checkpoint: dict) -> None:
    """Make Lightning's loop state agree with the train loader's position before Lightning restores it.

    A checkpoint written when training stopped at ``--max-updates``: Lightning has already counted the epoch
    it stopped in as finished (``epoch_progress`` one ahead of the loader's epoch). Resumed as it was, a run
    extended with a larger ``--max-updates`` stopped ("the data would not resume exactly"), or skipped the rest
    of the epoch when it had ended with one: the epoch count goes back to the loader's.

    The logging step is set by ``align_logging_step`` once training runs."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop")
    if not fit_loop or predates_resumable_data(checkpoint):
        return
    (loader,) = fit_loop["state_dict"]["combined_loader"]
    epochs = fit_loop["epoch_progress"]
    ahead = epochs["total"]["completed"] - loader["epoch"]
    if ahead > 0:
        for counter in ("total", "current"):
            for field in ("processed", "completed"):
                epochs[counter][field] = max(0, epochs[counter][field] - ahead)
        checkpoint["epoch"] = loader["epoch"]


def align_logging_step(trainer, skipped_steps: int) -> None:
    """The logging step (``_batches_that_stepped``, the x axis of TensorBoard and metrics.csv) before an update:
    the updates made plus those skipped, as it is in an uninterrupted run. A resumed run's came out one off: a
    checkpoint saved at validation has the last update not yet counted, and Lightning adds it back on resume
    only in some loop states (not in others, e.g. an epoch's end after several epochs), so it is set here,
    before every update (a no-op unless the run was resumed)."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step + skipped_steps


def predates_resumable_data(checkpoint: dict) -> bool:
    """A Lightning checkpoint written before the train loader saved its position (its fit loop has no
    ``combined_loader`` state): resuming it mid-epoch cannot replay the epoch's remaining batches."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    return "combined_loader" not in fit_loop
