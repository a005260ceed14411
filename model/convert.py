"""State-dict conversions: conv2d <-> conv1d extractor layout (spec §6.1, §6.9), the positional conv's
weight-norm names of torchaudio >= 2.1 <-> torchaudio 2.0 (Habana's base), and rebuilding a model from a
bare state dict.

All functions return new dicts and leave their input alone (Habana's helpers reshaped tensors in place,
which also reshaped the live optimizer state while a checkpoint was being written).
"""
import re
from typing import Dict, List, Optional

from torch import Tensor

from .hubert import ARCHS, FACTORIES, HuBERTPretrainModel, hubert_pretrain_model

# Saved by older checkpoints' configs, no longer model arguments: the HPU graph break per layer is now added by
# the training code (lightning.py).
RETIRED_ARGS = ("recompilation_optimization",)
_CONV_WEIGHT = re.compile(r"(^|\.)wav2vec2\.feature_extractor\.conv_layers\.\d+\.conv\.weight$")


def is_conv_weight(name: str) -> bool:
    return bool(_CONV_WEIGHT.search(name))


def _conv_layout(t: Tensor, use_conv2d: bool) -> Tensor:
    if use_conv2d and t.ndim == 3:
        return t.unsqueeze(2)
    if not use_conv2d and t.ndim == 4:
        return t.squeeze(2)
    return t


def convert_conv_layout(state_dict: Dict[str, Tensor], use_conv2d: bool) -> Dict[str, Tensor]:
    """Extractor conv weights as ``(C_out, C_in, 1, k)`` (``use_conv2d``) or ``(C_out, C_in, k)``; any key
    prefix (``model.`` in Lightning checkpoints) is kept."""
    return {k: _conv_layout(v, use_conv2d) if is_conv_weight(k) else v for k, v in state_dict.items()}


# The positional conv's weight norm: a parametrization since torchaudio 2.1 (ours), ``nn.utils.weight_norm``
# in torchaudio 2.0.1 and Habana's model. Same tensors (g, v), other names.
_WEIGHT_NORM = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
_POS_CONV = "encoder.transformer.pos_conv_embed.conv."


def convert_weight_norm(state_dict: Dict[str, Tensor], legacy: bool) -> Dict[str, Tensor]:
    """Positional-conv weight-norm keys as torchaudio 2.0 and Habana's scripts name them (``legacy``:
    ``weight_g`` / ``weight_v``) or as ours and torchaudio >= 2.1 do (``parametrizations.weight.original0/1``);
    other keys, and any key prefix, are kept."""
    renames = {v: k for k, v in _WEIGHT_NORM.items()} if not legacy else _WEIGHT_NORM
    out = {}
    for key, value in state_dict.items():
        head, sep, tail = key.rpartition(_POS_CONV)
        out[head + sep + renames.get(tail, tail) if sep else key] = value
    return out


def convert_optimizer_state(optimizer_state: dict, param_names: List[str], use_conv2d: bool) -> dict:
    """Reshape the per-parameter moments (``exp_avg``, ``exp_avg_sq``, ...) of the conv weights.

    ``param_names[i]`` names the optimizer's parameter ``i`` (the order of ``module.named_parameters()``
    when the optimizer was built from ``module.parameters()``). Matching by name, not by shape as upstream
    did, leaves other parameters of the same shape alone.
    """
    state = {}
    for idx, entry in optimizer_state["state"].items():
        if is_conv_weight(param_names[idx]):
            entry = {k: _conv_layout(v, use_conv2d) if isinstance(v, Tensor) and v.ndim >= 3 else v
                     for k, v in entry.items()}
        state[idx] = entry
    return {**optimizer_state, "state": state}


def strip_prefix(state_dict: Dict[str, Tensor], prefix: str = "model.") -> Dict[str, Tensor]:
    """Keys of a Lightning checkpoint's ``state_dict`` without the LightningModule attribute prefix.

    Only a leading prefix is removed (upstream removed every ``"model."`` substring)."""
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def infer_arch(state_dict: Dict[str, Tensor]) -> str:
    """Name of the factory (``hubert_pretrain_base`` ...) whose architecture has these shapes."""
    embed_dim = state_dict["wav2vec2.encoder.feature_projection.projection.weight"].shape[0]
    num_layers = len({k.split(".")[4] for k in state_dict if k.startswith("wav2vec2.encoder.transformer.layers.")})
    conv_channels = state_dict["wav2vec2.feature_extractor.conv_layers.0.conv.weight"].shape[0]
    for name, (_, conv, dim, layers, *_rest) in ARCHS.items():
        channels = conv[0][0] if conv else 512
        if (dim, layers, channels) == (embed_dim, num_layers, conv_channels):
            return f"hubert_pretrain_{name}"
    raise ValueError(
        f"no known HuBERT architecture has {num_layers} layers of width {embed_dim} and {conv_channels} CNN "
        "channels; rebuild it with model.hubert_pretrain_model(**config)"
    )


def model_from_state_dict(state_dict: Dict[str, Tensor], config: Optional[dict] = None,
                          **overrides) -> HuBERTPretrainModel:
    """Build a model and load ``state_dict`` (strict) into it.

    ``config`` is ``model.config`` as saved beside the weights; without it the architecture is inferred
    from the tensor shapes. ``overrides`` replace config entries or factory arguments (e.g.
    ``use_conv2d=False``); the conv layout of the weights follows the model's.
    """
    if config is not None:
        config = {k: v for k, v in config.items() if k not in RETIRED_ARGS}
        model = hubert_pretrain_model(**{**config, **overrides})
    else:
        num_classes = state_dict["logit_generator.label_embeddings"].shape[0]
        model = FACTORIES[infer_arch(state_dict)](**{"num_classes": num_classes, **overrides})
    use_conv2d = model.config["use_conv2d"]
    model.load_state_dict(convert_conv_layout(convert_weight_norm(state_dict, legacy=False), use_conv2d))
    return model
