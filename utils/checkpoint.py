"""Reading checkpoint files: Lightning checkpoints written by train.py, or plain state dicts (ours or
torchaudio's), in the conv1d or conv2d layout."""
import pickle
import zipfile
from pathlib import Path
from typing import Tuple

import torch

from model import HuBERTPretrainModel, model_from_state_dict, strip_prefix


def load_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load`` with ``weights_only=True``, and an error naming the file when it is missing,
    truncated or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"checkpoint {path} is truncated or not a PyTorch checkpoint: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return obj


def split_checkpoint(obj: dict) -> Tuple[dict, dict]:
    """(model state dict without the ``model.`` prefix, model config or None) of a loaded checkpoint."""
    if "state_dict" in obj:
        return strip_prefix(obj["state_dict"]), obj.get("hubert_config")
    return strip_prefix(obj), None


def load_pretrained_model(path, map_location="cpu", **overrides) -> HuBERTPretrainModel:
    """The model stored in a checkpoint file, rebuilt with its saved config (or the architecture inferred
    from its shapes); ``overrides`` replace model arguments, e.g. ``use_conv2d=False``."""
    state_dict, config = split_checkpoint(load_checkpoint(path, map_location))
    try:
        return model_from_state_dict(state_dict, config, **overrides)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"checkpoint {path} does not hold a HuBERT pre-training model: {e}") from e
