"""Masked / unmasked prediction accuracy (spec §8.4).

A frame is correct when the target (column 0) has the largest logit and the row is not constant
(argmax == argmin == 0 happens only for a constant row). Both versions return ``(correct, count)`` as
tensors, so nothing syncs with the device until the caller logs them.
"""
from typing import Tuple

import torch
from torch import Tensor


def _correct(logits: Tensor) -> Tensor:
    return (logits.argmax(-1) == 0) & (logits.argmin(-1) != 0)


def compute_accuracy(logits: Tensor) -> Tuple[Tensor, Tensor]:
    """Accuracy counts of the selected frames' logits ``(N, C+1)`` (dynamic path)."""
    # A fill on the device, not torch.tensor(n, device=...): that copies from the host and waits (CUDA).
    return _correct(logits).sum(), torch.full((), logits.shape[0], dtype=torch.long, device=logits.device)


def compute_accuracy_static(logits: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Accuracy counts of the frames selected by ``mask (B, T)`` from all-frames logits ``(B*T, C+1)``."""
    mask = mask.flatten()
    return (_correct(logits) & mask).sum(), mask.sum()
