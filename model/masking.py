"""Span masking for masked prediction (HuBERT §III-B: p = 8 % span starts, l = 10).

``compute_mask_indices`` makes exactly the random draws of torchaudio's ``_compute_mask_indices`` in the
same order (so a seed gives the same masks), with the span expansion vectorised.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


def _span_lengths(mask_type: str, num_mask: int, mask_length: int, mask_other: float) -> Tensor:
    if mask_type == "static":
        return torch.full((num_mask,), mask_length)
    if mask_type == "uniform":
        return torch.randint(int(mask_other), mask_length * 2 + 1, size=(num_mask,))
    if mask_type == "normal":
        lengths = torch.normal(float(mask_length), mask_other, size=(num_mask,))
        return torch.maximum(torch.ones(1), torch.round(lengths)).int()
    if mask_type == "poisson":
        return torch.round(torch.poisson(torch.full((num_mask,), float(mask_length)))).int()
    raise ValueError(f"unknown mask selection: {mask_type!r}")


@torch.compiler.disable  # a per-row loop over random counts: compiled, it would recompile for each count
def compute_mask_indices(
    shape: Tuple[int, int],
    padding_mask: Optional[Tensor],
    mask_prob: float,
    mask_length: int,
    mask_type: str = "static",
    mask_other: float = 0.0,
    min_masks: int = 0,
    no_overlap: bool = False,
    sizes: Optional[Sequence[int]] = None,
) -> Tensor:
    """Boolean ``(B, T)`` mask on CPU with the same number of masked frames in every row.

    Per row: ``num_mask = int(mask_prob * sz / mask_length + U[0,1))`` span starts (at least ``min_masks``)
    drawn without replacement, each covering ``mask_length`` frames; overlapping spans merge, then rows are
    subsampled to the smallest row count. ``sz`` is the unpadded length of the row: from ``sizes`` where the
    caller knows them on the host, else from ``padding_mask`` (copied to the host: a device sync).
    """
    if no_overlap:
        raise ValueError("no_overlap=True span masking is not supported (HuBERT uses overlapping spans)")
    batch_size, frame = shape
    mask = torch.zeros((batch_size, frame), dtype=torch.bool)
    all_num_mask = max(min_masks, int(mask_prob * frame / float(mask_length) + torch.rand(1)))
    if sizes is None and padding_mask is not None:
        sizes = (frame - padding_mask.cpu().long().sum(1)).tolist()

    mask_idcs = []
    for i in range(batch_size):
        if sizes is not None:
            sz = sizes[i]
            num_mask = max(min_masks, int(mask_prob * sz / float(mask_length) + torch.rand(1)))
        else:
            sz = frame
            num_mask = all_num_mask
        lengths = _span_lengths(mask_type, num_mask, mask_length, mask_other)
        if num_mask > 0 and lengths.sum() == 0:
            lengths[0] = min(mask_length, sz - 1)
        min_len = int(lengths.min()) if num_mask > 0 else mask_length
        if sz - min_len <= num_mask:
            min_len = sz - num_mask - 1
        starts = torch.randperm(sz - min_len)[:num_mask]
        lengths = lengths[: len(starts)].long()
        # Frame indices of every span, in the order upstream's nested comprehension lists them.
        first = torch.cumsum(lengths, 0) - lengths
        offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(first, lengths)
        idx = torch.repeat_interleave(starts, lengths) + offsets
        mask_idcs.append(torch.unique(idx[idx < sz]))

    min_count = min(len(m) for m in mask_idcs)
    for i, idx in enumerate(mask_idcs):
        if len(idx) > min_count:
            idx = idx[torch.randperm(len(idx))[:min_count]]
        mask[i, idx] = True
    return mask


class MaskGenerator(nn.Module):
    """Replaces masked frames with a learned ``mask_embedding``; optional channel masking (fine-tuning).

    ``static_indexing`` writes the embedding with ``torch.where`` (fixed shapes) instead of a
    boolean-index assignment.
    """

    def __init__(self, encoder_embed_dim, mask_prob, mask_selection, mask_other, mask_length, no_mask_overlap,
                 mask_min_space, mask_channel_prob, mask_channel_selection, mask_channel_other,
                 mask_channel_length, no_mask_channel_overlap, mask_channel_min_space, static_indexing=False):
        super().__init__()
        self.mask_prob = mask_prob
        self.mask_selection = mask_selection
        self.mask_other = mask_other
        self.mask_length = mask_length
        self.no_mask_overlap = no_mask_overlap
        self.mask_min_space = mask_min_space
        self.mask_channel_prob = mask_channel_prob
        self.mask_channel_selection = mask_channel_selection
        self.mask_channel_other = mask_channel_other
        self.mask_channel_length = mask_channel_length
        self.no_mask_channel_overlap = no_mask_channel_overlap
        self.mask_channel_min_space = mask_channel_min_space
        self.static_indexing = static_indexing
        self.mask_embedding = nn.Parameter(torch.empty(encoder_embed_dim))
        nn.init.uniform_(self.mask_embedding)

    def draw(self, shape: Tuple[int, int, int], sizes: Optional[Sequence[int]] = None
             ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The span mask ``(B, T)`` and channel mask ``(B, C)`` (CPU; None where that masking is off) that
        ``forward`` would draw for ``x`` of ``shape`` whose rows have ``sizes`` unpadded frames."""
        B, T, C = shape
        mask = channels = None
        if self.mask_prob > 0:
            mask = compute_mask_indices((B, T), None, self.mask_prob, self.mask_length, self.mask_selection,
                                        self.mask_other, min_masks=2, no_overlap=self.no_mask_overlap, sizes=sizes)
        if self.mask_channel_prob > 0:
            channels = compute_mask_indices((B, C), None, self.mask_channel_prob, self.mask_channel_length,
                                            self.mask_channel_selection, self.mask_channel_other,
                                            no_overlap=self.no_mask_channel_overlap)
        return mask, channels

    def forward(self, x: Tensor, padding_mask: Optional[Tensor],
                drawn: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Masks ``x`` with the masks ``drawn`` beforehand (``draw``), else draws them now."""
        if drawn is None:
            T = x.shape[1]
            sizes = None if padding_mask is None else (T - padding_mask.cpu().long().sum(1)).tolist()
            drawn = self.draw(x.shape, sizes)
        mask_indices, channels = (m if m is None else m.to(x.device, non_blocking=True) for m in drawn)
        if mask_indices is not None:
            embedding = self.mask_embedding.to(x.dtype)
            if self.static_indexing:
                x = torch.where(mask_indices[..., None], embedding, x)
            else:
                x[mask_indices] = embedding
        if channels is not None:
            x = torch.where(channels[:, None, :], 0.0, x)
        return x, mask_indices
