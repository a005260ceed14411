"""HuBERTPretrainModel (Hsu et al. 2021), state-dict compatible with ``torchaudio.models``.

``hubert_pretrain_model`` takes torchaudio's arguments plus the Habana static-shape flags (keyword-only,
off by default); the factories carry the upstream hyperparameters. ``model.config`` holds every argument,
so a checkpoint can rebuild the exact model.
"""
import math
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from . import components
from .logits import LogitGenerator, at_least_fp32
from .masking import MaskGenerator

HUBERT_CONV = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


class Wav2Vec2Model(nn.Module):
    """Feature extractor + encoder (``aux`` kept for torchaudio compatibility; unused in pre-training)."""

    def __init__(self, feature_extractor: nn.Module, encoder: nn.Module, aux: Optional[nn.Module] = None):
        super().__init__()
        self.feature_extractor = feature_extractor
        self.encoder = encoder
        self.aux = aux

    @torch.jit.export
    def extract_features(self, waveforms: Tensor, lengths: Optional[Tensor] = None,
                         num_layers: Optional[int] = None) -> Tuple[List[Tensor], Optional[Tensor]]:
        """Outputs of transformer layers 1..num_layers (all if None; 0: the layers' input), each ``(B, T, D)``,
        and frame lengths."""
        x, lengths = self.feature_extractor(waveforms, lengths)
        return self.encoder.extract_features(x, lengths, num_layers), lengths

    def forward(self, waveforms: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        x, lengths = self.feature_extractor(waveforms, lengths)
        x = self.encoder(x, lengths)
        if self.aux is not None:
            x = self.aux(x)
        return x, lengths


class Draws(NamedTuple):
    """Host-side random choices of one training forward (``HuBERTPretrainModel.draw``)."""
    mask: Optional[Tensor]  # (B, T) bool span mask on the CPU; None without span masking
    channels: Optional[Tensor]  # (B, C) bool channel mask on the CPU (fine-tuning); None without
    dropped: Optional[Tensor]  # (num_layers,) bool on the CPU, the layers layer drop skips; None outside training


class HuBERTPretrainModel(nn.Module):
    """Masked prediction of cluster labels.

    ``forward(waveforms (B, N), labels (B, T), audio_lengths (B,))`` returns ``(logit_m, logit_u,
    features_pen)``; with ``static_logit_generator`` it returns ``(logits (B*T, C+1), mask_m, mask_u,
    features_pen)`` instead (every shape fixed by the batch shape).
    """

    def __init__(self, wav2vec2: Wav2Vec2Model, mask_generator: MaskGenerator, logit_generator: LogitGenerator,
                 feature_grad_mult: Optional[float], static_logit_generator: bool = False):
        super().__init__()
        self.wav2vec2 = wav2vec2
        self.mask_generator = mask_generator
        self.logit_generator = logit_generator
        if feature_grad_mult is not None and not 0.0 < feature_grad_mult < 1.0:
            raise ValueError(f"feature_grad_mult must be None or in (0, 1), got {feature_grad_mult}")
        self.feature_grad_mult = feature_grad_mult
        self.static_logit_generator = static_logit_generator
        self.config: dict = {}

    def draw(self, num_samples: List[int]) -> Draws:
        """The random choices a training forward makes on the host, for a batch of utterances of ``num_samples``
        samples (padded to the longest), drawn now from the CPU generator in the forward's order: span masks,
        then a number per layer. Given to ``forward``, it copies no mask to the host and calls no ``.item()``
        per layer (no device sync, no compiled-graph break). The same numbers as the forward would draw where
        nothing else uses the CPU generator in between (a GPU or HPU model; on CPU, dropout draws from it too)."""
        frames = self.wav2vec2.feature_extractor.frame_lengths(num_samples)
        shape = (len(frames), max(frames), self.wav2vec2.encoder.feature_projection.projection.out_features)
        return Draws(*self.mask_generator.draw(shape, frames), self.wav2vec2.encoder.transformer.draw())

    def forward(self, waveforms: Tensor, labels: Tensor, audio_lengths: Optional[Tensor] = None,
                draws: Optional[Draws] = None):
        x, lengths = self.wav2vec2.feature_extractor(waveforms, audio_lengths)
        if labels.shape[1] != x.shape[1]:
            raise ValueError(
                f"labels have {labels.shape[1]} frames but the model makes {x.shape[1]} frames from "
                f"{waveforms.shape[1]} samples (floor((N - 400) / 320) + 1 at 50 Hz); check the label rate "
                "(MFCC labels are 100 Hz and are halved by the collate function)"
            )
        if self.feature_grad_mult is not None:
            x = components.GradMultiply.apply(x, self.feature_grad_mult)
        features_pen = at_least_fp32(x).pow(2).mean()
        padding_mask = components.get_padding_mask(x, lengths) if lengths is not None else None
        x, attention_mask = self.wav2vec2.encoder._preprocess(x, lengths)
        x, mask = self.mask_generator(x, padding_mask, None if draws is None else (draws.mask, draws.channels))
        x = self.wav2vec2.encoder.transformer(x, attention_mask, None if draws is None else draws.dropped)
        if mask is None:
            mask = torch.zeros_like(labels, dtype=torch.bool)
        if padding_mask is not None:
            mask_m = ~padding_mask & mask
            mask_u = ~padding_mask & ~mask_m
        else:
            mask_m, mask_u = mask, ~mask
        if self.static_logit_generator:
            return self.logit_generator.all_frames(x, labels), mask_m, mask_u, features_pen
        logit_m, logit_u = self.logit_generator(x, labels, mask_m, mask_u)
        return logit_m, logit_u, features_pen


def _init_transformer_params(module: nn.Module) -> None:
    """BERT init: Linear weights N(0, 0.02) drawn on the CPU generator (device-independent), biases 0."""
    if isinstance(module, nn.Linear):
        module.weight.data.copy_(module.weight.data.cpu().normal_(mean=0.0, std=0.02))
        if module.bias is not None:
            module.bias.data.zero_()


def _init_hubert_pretrain_model(module: nn.Module) -> None:
    """Upstream init, applied post-order (children first), so the transformer-wide N(0, 0.02) overrides
    the xavier init of the attention projections; the positional conv's normal init is overwritten by
    weight norm on every forward, only its zero bias sticks (upstream-spec §5.4)."""
    if isinstance(module, components.ConvLayerBlock):
        nn.init.kaiming_normal_(module.conv.weight)
    elif isinstance(module, components.ConvolutionalPositionalEmbedding):
        std = math.sqrt(4.0 / (module.embed_dim * module.kernel_size))
        nn.init.normal_(module.conv.weight, mean=0.0, std=std)
        nn.init.constant_(module.conv.bias, 0.0)
    elif isinstance(module, components.SelfAttention):
        for proj in (module.k_proj, module.v_proj, module.q_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(module.out_proj.weight)
        nn.init.constant_(module.out_proj.bias, 0.0)
    elif isinstance(module, components.Transformer):
        module.apply(_init_transformer_params)


def hubert_pretrain_model(
    extractor_mode: str,
    extractor_conv_layer_config: Optional[List[Tuple[int, int, int]]],
    extractor_conv_bias: bool,
    encoder_embed_dim: int,
    encoder_projection_dropout: float,
    encoder_pos_conv_kernel: int,
    encoder_pos_conv_groups: int,
    encoder_num_layers: int,
    encoder_num_heads: int,
    encoder_attention_dropout: float,
    encoder_ff_interm_features: int,
    encoder_ff_interm_dropout: float,
    encoder_dropout: float,
    encoder_layer_norm_first: bool,
    encoder_layer_drop: float,
    mask_prob: float,
    mask_selection: str,
    mask_other: float,
    mask_length: int,
    no_mask_overlap: bool,
    mask_min_space: int,
    mask_channel_prob: float,
    mask_channel_selection: str,
    mask_channel_other: float,
    mask_channel_length: int,
    no_mask_channel_overlap: bool,
    mask_channel_min_space: int,
    skip_masked: bool,
    skip_nomask: bool,
    num_classes: int,
    final_dim: int,
    feature_grad_mult: Optional[float],
    *,
    use_conv2d: bool = False,
    use_instancenorm: bool = False,
    static_indexing: bool = False,
    static_layerdrop: bool = False,
    static_logit_generator: bool = False,
    split_logits: bool = False,
    use_max_sub_softmax_opt: bool = False,
    no_layerdrop: bool = False,
    all_deterministic: bool = False,
    label_embedding_init: str = "uniform",
) -> HuBERTPretrainModel:
    """Builds a HuBERTPretrainModel from torchaudio's arguments plus the Habana flags.

    ``no_layerdrop`` sets layer drop to 0 and ``all_deterministic`` sets every dropout to 0.
    ``label_embedding_init="normal"`` starts the label embeddings zero-mean (upstream: uniform [0, 1),
    so all classes start nearly parallel).
    ``use_max_sub_softmax_opt`` is accepted for Habana CLI parity: attention is SDPA, whose fused softmax
    already does the max subtraction on every device.
    """
    config = dict(locals())
    conv_config = extractor_conv_layer_config or HUBERT_CONV
    if no_layerdrop:
        encoder_layer_drop = 0.0
    if all_deterministic:
        encoder_projection_dropout = encoder_attention_dropout = 0.0
        encoder_ff_interm_dropout = encoder_dropout = 0.0
    feature_extractor = components.get_feature_extractor(
        extractor_mode, conv_config, extractor_conv_bias, use_conv2d, use_instancenorm)
    encoder = components.get_encoder(
        in_features=conv_config[-1][0],
        embed_dim=encoder_embed_dim,
        dropout_input=encoder_projection_dropout,
        pos_conv_kernel=encoder_pos_conv_kernel,
        pos_conv_groups=encoder_pos_conv_groups,
        num_layers=encoder_num_layers,
        num_heads=encoder_num_heads,
        attention_dropout=encoder_attention_dropout,
        ff_interm_features=encoder_ff_interm_features,
        ff_interm_dropout=encoder_ff_interm_dropout,
        dropout=encoder_dropout,
        layer_norm_first=encoder_layer_norm_first,
        layer_drop=encoder_layer_drop,
        static_indexing=static_indexing,
        static_layerdrop=static_layerdrop,
    )
    mask_generator = MaskGenerator(
        encoder_embed_dim, mask_prob, mask_selection, mask_other, mask_length, no_mask_overlap, mask_min_space,
        mask_channel_prob, mask_channel_selection, mask_channel_other, mask_channel_length,
        no_mask_channel_overlap, mask_channel_min_space, static_indexing,
    )
    logit_generator = LogitGenerator(encoder_embed_dim, num_classes, final_dim, skip_masked, skip_nomask,
                                     split_logits, label_embedding_init)
    model = HuBERTPretrainModel(Wav2Vec2Model(feature_extractor, encoder), mask_generator, logit_generator,
                                feature_grad_mult, static_logit_generator)
    model.apply(_init_hubert_pretrain_model)
    model.config = config
    return model


# Architecture of each factory: extractor, conv config (None = HUBERT_CONV), encoder width, layers, heads,
# FFN width, pre-LN, final_dim. Positional conv is k=128, 16 groups everywhere.
TINY_CONV = [(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2
ARCHS = {
    "base": ("group_norm", None, 768, 12, 12, 3072, False, 256),
    "large": ("layer_norm", None, 1024, 24, 16, 4096, True, 768),
    "xlarge": ("layer_norm", None, 1280, 48, 16, 5120, True, 1024),
    "tiny": ("group_norm", TINY_CONV, 256, 6, 4, 1024, True, 128),
}


def _pretrain(arch: str, args: dict) -> HuBERTPretrainModel:
    """The shared part of the factories: static span masks (l=10), no loss skips. ``args`` are the
    factory's own arguments (``locals()``), its ``**flags`` included; flags may also override any
    architecture setting (``train.py --model-arg``)."""
    mode, conv, embed_dim, num_layers, num_heads, ff_dim, layer_norm_first, final_dim = ARCHS[arch]
    args = dict(args)
    flags = args.pop("flags")
    fixed = dict(
        extractor_mode=mode,
        extractor_conv_layer_config=conv,
        extractor_conv_bias=False,
        encoder_embed_dim=embed_dim,
        encoder_pos_conv_kernel=128,
        encoder_pos_conv_groups=16,
        encoder_num_layers=num_layers,
        encoder_num_heads=num_heads,
        encoder_ff_interm_features=ff_dim,
        encoder_layer_norm_first=layer_norm_first,
        mask_selection="static",
        mask_other=0.0,
        mask_length=10,
        no_mask_overlap=False,
        mask_min_space=1,
        mask_channel_selection="static",
        mask_channel_other=0.0,
        no_mask_channel_overlap=False,
        mask_channel_min_space=1,
        skip_masked=False,
        skip_nomask=False,
        final_dim=final_dim,
    )
    return hubert_pretrain_model(**{**fixed, **args, **flags})


def hubert_pretrain_base(
    encoder_projection_dropout: float = 0.1,
    encoder_attention_dropout: float = 0.1,
    encoder_ff_interm_dropout: float = 0.0,
    encoder_dropout: float = 0.1,
    encoder_layer_drop: float = 0.05,
    mask_prob: float = 0.8,
    mask_channel_prob: float = 0.0,
    mask_channel_length: int = 10,
    feature_grad_mult: Optional[float] = 0.1,
    num_classes: int = 100,
    **flags,
) -> HuBERTPretrainModel:
    """HuBERT Base: 12 x 768, 12 heads, FFN 3072, post-LN, GroupNorm extractor, final_dim 256 (95 M)."""
    return _pretrain("base", locals())


def hubert_pretrain_large(
    encoder_projection_dropout: float = 0.0,
    encoder_attention_dropout: float = 0.0,
    encoder_ff_interm_dropout: float = 0.0,
    encoder_dropout: float = 0.0,
    encoder_layer_drop: float = 0.0,
    mask_prob: float = 0.8,
    mask_channel_prob: float = 0.0,
    mask_channel_length: int = 10,
    feature_grad_mult: Optional[float] = None,
    num_classes: int = 500,
    **flags,
) -> HuBERTPretrainModel:
    """HuBERT Large: 24 x 1024, 16 heads, FFN 4096, pre-LN, LayerNorm extractor, final_dim 768 (316 M)."""
    return _pretrain("large", locals())


def hubert_pretrain_xlarge(
    encoder_projection_dropout: float = 0.0,
    encoder_attention_dropout: float = 0.0,
    encoder_ff_interm_dropout: float = 0.0,
    encoder_dropout: float = 0.0,
    encoder_layer_drop: float = 0.0,
    mask_prob: float = 0.8,
    mask_channel_prob: float = 0.0,
    mask_channel_length: int = 10,
    feature_grad_mult: Optional[float] = None,
    num_classes: int = 500,
    **flags,
) -> HuBERTPretrainModel:
    """HuBERT X-Large: 48 x 1280, 16 heads, FFN 5120, pre-LN, LayerNorm extractor, final_dim 1024 (1 B)."""
    return _pretrain("xlarge", locals())


def hubert_pretrain_tiny(
    encoder_projection_dropout: float = 0.1,
    encoder_attention_dropout: float = 0.0,
    encoder_ff_interm_dropout: float = 0.0,
    encoder_dropout: float = 0.1,
    encoder_layer_drop: float = 0.05,
    mask_prob: float = 0.5,
    mask_length: int = 5,
    mask_channel_prob: float = 0.0,
    mask_channel_length: int = 10,
    feature_grad_mult: Optional[float] = 0.1,
    num_classes: int = 100,
    label_embedding_init: str = "normal",
    **flags,
) -> HuBERTPretrainModel:
    """A CPU-scale HuBERT for tests and the demo (5.4 M parameters): Base's CNN kernels and strides with 64
    channels (50 Hz frames), 6 x 256 transformer, 4 heads, FFN 1024, final_dim 128. Unlike Base it is pre-LN,
    masks less (mask_prob 0.5, 5-frame spans: on real speech 3.5x the label prior in 20 CPU minutes where
    10-frame spans reach 2.8x), starts its label embeddings zero-mean and has no attention dropout (which
    costs a fifth of a CPU training step: bench/tiny_speed.py): the settings that learn within 20 CPU minutes
    (docs/tiny_study.md, docs/real_speech.md)."""
    return _pretrain("tiny", locals())


FACTORIES = {
    "hubert_pretrain_base": hubert_pretrain_base,
    "hubert_pretrain_large": hubert_pretrain_large,
    "hubert_pretrain_xlarge": hubert_pretrain_xlarge,
    "hubert_pretrain_tiny": hubert_pretrain_tiny,
}
