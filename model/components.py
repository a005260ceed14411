"""Building blocks of the HuBERT encoder (wav2vec 2.0 architecture).

Parameter names and shapes follow ``torchaudio.models.wav2vec2.components`` so that state dicts move both
ways. The Habana static-shape options (conv2d extractor, instance norm, ``torch.where`` padding and layer
drop) are constructor flags, off by default. Nothing here knows about devices: an HPU graph break per
layer (``--recompilation-optimization``) is added by the training code with forward hooks.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn


class LayerNorm(nn.LayerNorm):
    """Layer norm over the channel axis (dim 1) of ``(B, C, T)`` or ``(B, C, 1, T)`` conv outputs."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, -1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.transpose(1, -1)


class ConvLayerBlock(nn.Module):
    """Conv -> optional norm -> GELU. With ``use_conv2d`` the conv is a (1, k) Conv2d on ``(B, C, 1, T)``,
    mathematically the same as Conv1d; the weight gains a singleton axis 2."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, bias, layer_norm, use_conv2d=False):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.layer_norm = layer_norm
        if use_conv2d:
            self.conv = nn.Conv2d(in_channels, out_channels, (1, kernel_size), stride=(1, stride), bias=bias)
        else:
            self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)

    def forward(self, x: Tensor, length: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        x = self.conv(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        x = nn.functional.gelu(x)
        if length is not None:
            length = torch.div(length - self.kernel_size, self.stride, rounding_mode="floor") + 1
            length = torch.clamp(length, min=0)
        return x, length


class FeatureExtractor(nn.Module):
    """Waveform ``(B, N)`` -> frames ``(B, T, C)``, ``T = floor((N - 400) / 320) + 1`` for the HuBERT stack."""

    def __init__(self, conv_layers: nn.ModuleList, use_conv2d: bool = False):
        super().__init__()
        self.conv_layers = conv_layers
        self.use_conv2d = use_conv2d

    def frame_lengths(self, num_samples: List[int]) -> List[int]:
        """Frame counts of utterances of ``num_samples`` samples, on the host: what ``forward`` computes on the
        device for its ``length``."""
        for layer in self.conv_layers:
            num_samples = [max((n - layer.kernel_size) // layer.stride + 1, 0) for n in num_samples]
        return num_samples

    def forward(self, x: Tensor, length: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        if x.ndim != 2:
            raise ValueError(f"Expected the input Tensor to be 2D (batch, time). Found: {list(x.shape)}")
        x = x[:, None, None] if self.use_conv2d else x[:, None]
        for layer in self.conv_layers:
            x, length = layer(x, length)
        if self.use_conv2d:
            x = x.squeeze(2)
        return x.transpose(1, 2), length


class FeatureProjection(nn.Module):
    def __init__(self, in_features: int, out_features: int, dropout: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_features)
        self.projection = nn.Linear(in_features, out_features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.projection(self.layer_norm(x)))


class ConvolutionalPositionalEmbedding(nn.Module):
    """Grouped conv over time with weight norm; the even kernel's extra output frame is dropped.

    ``conv`` carries torch's weight-norm parametrization (torchaudio's parameter names), but ``forward``
    computes the normalised weight itself, with the op the parametrization uses: TorchScript cannot run
    parametrizations, and so the live module scripts as it is (torchaudio removes the weight norm from it).
    """

    def __init__(self, embed_dim: int, kernel_size: int, groups: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.kernel_size = kernel_size
        conv = nn.Conv1d(embed_dim, embed_dim, kernel_size, padding=kernel_size // 2, groups=groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.num_remove = 1 if kernel_size % 2 == 0 else 0

    def __prepare_scriptable__(self):
        """Nothing to prepare (torchaudio's removes the weight norm here, and its tests call this)."""
        return self

    def forward(self, x: Tensor) -> Tensor:
        norm = self.conv.parametrizations.weight  # original0 = g, original1 = v
        weight = torch._weight_norm(norm.original1, norm.original0, 2)
        x = nn.functional.conv1d(x.transpose(-2, -1), weight, self.conv.bias, padding=self.kernel_size // 2,
                                 groups=self.conv.groups)
        if self.num_remove > 0:
            x = x[..., : -self.num_remove]
        return nn.functional.gelu(x).transpose(-2, -1)


class SelfAttention(nn.Module):
    """Multi-head self attention through ``scaled_dot_product_attention``.

    SDPA's softmax subtracts the row maximum internally, so upstream's explicit max subtraction and
    Habana's ``use_max_sub_softmax_opt`` (which removes it) compute the same function here.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        head_dim = embed_dim // num_heads
        if head_dim * num_heads != embed_dim:
            raise ValueError(f"`embed_dim ({embed_dim})` is not divisible by `num_heads ({num_heads})`")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """``attention_mask``: bool ``(B, 1, 1, T)``, True where a key may be attended, or None."""
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, self.embed_dim))


class FeedForward(nn.Module):
    def __init__(self, io_features, intermediate_features, intermediate_dropout, output_dropout):
        super().__init__()
        self.intermediate_dense = nn.Linear(io_features, intermediate_features)
        self.intermediate_dropout = nn.Dropout(intermediate_dropout)
        self.output_dense = nn.Linear(intermediate_features, io_features)
        self.output_dropout = nn.Dropout(output_dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.intermediate_dropout(nn.functional.gelu(self.intermediate_dense(x)))
        return self.output_dropout(self.output_dense(x))


class EncoderLayer(nn.Module):
    """Post-LN (Base) or pre-LN (Large, X-Large) transformer layer."""

    def __init__(self, attention: SelfAttention, dropout: float, layer_norm_first: bool, feed_forward: FeedForward):
        super().__init__()
        self.attention = attention
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(attention.embed_dim)
        self.layer_norm_first = layer_norm_first
        self.feed_forward = feed_forward
        self.final_layer_norm = nn.LayerNorm(attention.embed_dim)

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        residual = x
        if self.layer_norm_first:
            x = self.layer_norm(x)
        x = residual + self.dropout(self.attention(x, attention_mask))
        if self.layer_norm_first:
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x)
        return self.final_layer_norm(x + self.feed_forward(x))


class Transformer(nn.Module):
    """Positional conv, optional first LN, dropout, then the layers with layer drop.

    In training every layer draws one ``torch.rand(1)``, also without layer drop (Large, X-Large,
    ``no_layerdrop``), as torchaudio does, so a seed gives torchaudio's random numbers. With ``static_layerdrop``
    every layer is computed and a dropped one is undone with ``torch.where`` (one graph for every drop
    pattern; dropped layers get zero gradients instead of none).
    """

    def __init__(self, pos_conv_embed, dropout, layers, layer_norm_first, layer_drop, static_layerdrop=False):
        super().__init__()
        self.pos_conv_embed = pos_conv_embed
        self.layer_norm = nn.LayerNorm(pos_conv_embed.embed_dim)
        self.layer_norm_first = layer_norm_first
        self.layer_drop = layer_drop
        self.dropout = nn.Dropout(dropout)
        self.layers = layers
        self.static_layerdrop = static_layerdrop

    def _preprocess(self, x: Tensor) -> Tensor:
        x = x + self.pos_conv_embed(x)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return self.dropout(x)

    def draw(self) -> Optional[Tensor]:
        """Which layers layer drop skips in a training forward (CPU bools; a number per layer, drawn as the
        forward draws them); None outside training."""
        if not self.training:
            return None
        draws = torch.cat([torch.rand(1) for _ in self.layers]) if len(self.layers) else torch.zeros(0)
        return (draws <= self.layer_drop) & (self.layer_drop > 0)

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None, dropped: Optional[Tensor] = None) -> Tensor:
        """``dropped``: the layers to skip, drawn beforehand (``draw``); else each layer draws as it comes. Static
        layer drop takes them as one device tensor (a single copy, and one compiled graph for every pattern)."""
        x = self._preprocess(x)
        drop_layers = self.training and self.layer_drop > 0
        on_device: Optional[Tensor] = None
        host: List[bool] = []
        if dropped is not None and drop_layers:
            if self.static_layerdrop:
                on_device = dropped.to(x.device, non_blocking=True)
            else:
                host = torch.jit.annotate(List[bool], dropped.tolist())
        for i, layer in enumerate(self.layers):
            skip = False
            if dropped is not None:
                skip = len(host) > 0 and host[i]
            elif self.training:
                draw = torch.rand(1)
                skip = drop_layers and draw.item() <= self.layer_drop
            if self.static_layerdrop and drop_layers:
                y = layer(x, attention_mask)
                drop = on_device[i] if on_device is not None else torch.tensor(skip, device=x.device)
                x = torch.where(drop, x, y)
            elif not skip:
                x = layer(x, attention_mask)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        return x

    def get_intermediate_outputs(self, x: Tensor, attention_mask: Optional[Tensor] = None,
                                 num_layers: Optional[int] = None) -> List[Tensor]:
        """Outputs of layers 1..num_layers (all if None). ``num_layers=0``, which torchaudio refuses, gives
        the layers' input alone (projected features + positional conv; layer-normed in post-LN models)."""
        if num_layers is not None and not 0 <= num_layers <= len(self.layers):
            raise ValueError(f"`num_layers` must be between [0, {len(self.layers)}]")
        x = self._preprocess(x)
        if num_layers is not None and num_layers == 0:
            return [x]
        outputs: List[Tensor] = []
        for layer in self.layers:
            x = layer(x, attention_mask)
            outputs.append(x)
            if num_layers is not None and len(outputs) == num_layers:
                return outputs
        return outputs


class Encoder(nn.Module):
    """Feature projection + transformer. ``static_indexing`` zeroes padded frames with ``torch.where``
    instead of a boolean-index write (a data-dependent shape on HPU)."""

    def __init__(self, feature_projection, transformer, static_indexing=False):
        super().__init__()
        self.feature_projection = feature_projection
        self.transformer = transformer
        self.static_indexing = static_indexing

    def _preprocess(self, features: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        x = self.feature_projection(features)
        if lengths is None:
            return x, None
        padding_mask = get_padding_mask(x, lengths)
        if self.static_indexing:
            x = torch.where(padding_mask[..., None], 0.0, x)
        else:
            x[padding_mask] = 0.0
        # Keys of padded frames are masked out; as upstream's additive -10000 mask, they get zero weight.
        return x, ~padding_mask[:, None, None, :]

    def forward(self, features: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        x, mask = self._preprocess(features, lengths)
        return self.transformer(x, attention_mask=mask)

    def extract_features(self, features: Tensor, lengths: Optional[Tensor] = None,
                         num_layers: Optional[int] = None) -> List[Tensor]:
        x, mask = self._preprocess(features, lengths)
        return self.transformer.get_intermediate_outputs(x, attention_mask=mask, num_layers=num_layers)


def get_padding_mask(x: Tensor, lengths: Tensor) -> Tensor:
    """``(B, T)`` bool, True at padded frames of ``x (B, T, ...)``."""
    batch_size, max_len = x.shape[:2]
    return torch.arange(max_len, device=lengths.device).expand(batch_size, max_len) >= lengths[:, None]


class GradMultiply(torch.autograd.Function):
    """Identity forward; gradient scaled by ``scale`` backward (``feature_grad_mult``)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def get_feature_extractor(norm_mode: str, shapes: List[Tuple[int, int, int]], bias: bool,
                          use_conv2d: bool = False, use_instancenorm: bool = False) -> FeatureExtractor:
    """``group_norm``: one GroupNorm(C, C) after conv 0 (Base), equal to InstanceNorm with affine, which
    ``use_instancenorm`` selects. ``layer_norm``: LayerNorm after every conv (Large, X-Large)."""
    if norm_mode not in ("group_norm", "layer_norm"):
        raise ValueError(f"Invalid norm mode: {norm_mode!r}")
    blocks = []
    in_channels = 1
    for i, (out_channels, kernel_size, stride) in enumerate(shapes):
        norm = None
        if norm_mode == "group_norm" and i == 0:
            if use_instancenorm:
                cls = nn.InstanceNorm2d if use_conv2d else nn.InstanceNorm1d
                norm = cls(out_channels, affine=True, track_running_stats=False)
            else:
                norm = nn.GroupNorm(num_groups=out_channels, num_channels=out_channels, affine=True)
        elif norm_mode == "layer_norm":
            norm = LayerNorm(normalized_shape=out_channels, elementwise_affine=True)
        blocks.append(ConvLayerBlock(in_channels, out_channels, kernel_size, stride, bias, norm, use_conv2d))
        in_channels = out_channels
    return FeatureExtractor(nn.ModuleList(blocks), use_conv2d)


def get_encoder(in_features, embed_dim, dropout_input, pos_conv_kernel, pos_conv_groups, num_layers, num_heads,
                attention_dropout, ff_interm_features, ff_interm_dropout, dropout, layer_norm_first, layer_drop,
                static_indexing=False, static_layerdrop=False) -> Encoder:
    feature_projection = FeatureProjection(in_features, embed_dim, dropout_input)
    pos_conv = ConvolutionalPositionalEmbedding(embed_dim, pos_conv_kernel, pos_conv_groups)
    layers = nn.ModuleList(
        EncoderLayer(
            SelfAttention(embed_dim, num_heads, attention_dropout),
            dropout,
            layer_norm_first,
            FeedForward(embed_dim, ff_interm_features, ff_interm_dropout, dropout),
        )
        for _ in range(num_layers)
    )
    transformer = Transformer(pos_conv, dropout, layers, not layer_norm_first, layer_drop, static_layerdrop)
    return Encoder(feature_projection, transformer, static_indexing)
