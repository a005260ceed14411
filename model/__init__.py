"""Our static-shape HuBERT, state-dict compatible with ``torchaudio.models.HuBERTPretrainModel``."""
from .convert import (convert_conv_layout, convert_optimizer_state, convert_weight_norm, infer_arch,
                      model_from_state_dict, strip_prefix)
from .hubert import (FACTORIES, Draws, HuBERTPretrainModel, Wav2Vec2Model, hubert_pretrain_base, hubert_pretrain_large,
                     hubert_pretrain_model, hubert_pretrain_tiny, hubert_pretrain_xlarge)

__all__ = [
    "Draws",
    "FACTORIES",
    "HuBERTPretrainModel",
    "Wav2Vec2Model",
    "convert_conv_layout",
    "convert_optimizer_state",
    "convert_weight_norm",
    "hubert_pretrain_base",
    "hubert_pretrain_large",
    "hubert_pretrain_model",
    "hubert_pretrain_tiny",
    "hubert_pretrain_xlarge",
    "infer_arch",
    "model_from_state_dict",
    "strip_prefix",
]
