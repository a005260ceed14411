"""HuBERT pre-training loss (spec §7): cross entropy of the target (logit column 0) summed over masked
frames, plus ``feature_weight`` times the feature penalty weighted by the number of masked frames."""
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F


def _ce_sum(logits: Tensor) -> Tensor:
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[:1], dtype=torch.long), reduction="sum")


def hubert_loss(
    logit_m: Tensor,
    logit_u: Optional[Tensor],
    feature_penalty: Tensor,
    masked_weight: float = 1.0,
    unmasked_weight: float = 0.0,
    feature_weight: float = 10.0,
    reduction: str = "sum",
) -> Tensor:
    """Loss from the masked / unmasked logits of the dynamic model. ``reduction="mean"`` divides each
    cross-entropy term by its own frame count."""
    num_masked = logit_m.shape[0]
    loss = feature_penalty * feature_weight * num_masked
    loss = loss + masked_weight * _reduce(_ce_sum(logit_m), num_masked, reduction)
    if logit_u is not None and unmasked_weight != 0:
        loss = loss + unmasked_weight * _reduce(_ce_sum(logit_u), logit_u.shape[0], reduction)
    return loss


def hubert_loss_static(
    logit: Tensor,
    mask_m: Tensor,
    mask_u: Tensor,
    feature_penalty: Tensor,
    masked_weight: float = 1.0,
    unmasked_weight: float = 0.0,
    feature_weight: float = 10.0,
    reduction: str = "sum",
) -> Tensor:
    """The same loss from the all-frames logits ``(B*T, C+1)`` and the ``(B, T)`` masks (fixed shapes).

    Equal to ``hubert_loss`` for both reductions (Habana's ``mean`` divided by all B*T frames instead)."""
    ce = F.cross_entropy(logit, torch.zeros(len(logit), dtype=torch.long, device=logit.device), reduction="none")
    mask_m, mask_u = mask_m.flatten(), mask_u.flatten()
    num_masked = mask_m.sum()
    loss = feature_penalty * feature_weight * num_masked
    loss = loss + masked_weight * _reduce(torch.where(mask_m, ce, 0.0).sum(), num_masked, reduction)
    if unmasked_weight != 0:
        loss = loss + unmasked_weight * _reduce(torch.where(mask_u, ce, 0.0).sum(), mask_u.sum(), reduction)
    return loss


def _reduce(total: Tensor, count, reduction: str) -> Tensor:
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / count
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
