"""HuBERT logits: cosine similarity between projected frames and label embeddings, temperature 0.1.

Upstream builds a ``(C+1, N, F)`` tensor (the target embedding plus every class) and calls
``cosine_similarity``. The same function is one normalised ``(N, F) @ (F, C)`` matmul: the target column
is gathered from it and moved to the front, and every class whose embedding equals the target's is set to
``-inf`` (the target's own column included), so cross entropy with target index 0 is a softmax over the
``C`` classes. Computed and returned in fp32 even under autocast (in float64 for a float64 model, where
upstream's ``.float()`` would round it to fp32); upstream cast them back to the autocast dtype, which in bf16
rounds logits near 10 to steps of 0.0625 and makes ties that count as correct predictions.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

LOGIT_TEMP = 0.1


def at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    # ``torch.cosine_similarity`` divides each input by its norm clamped at eps.
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def compute_logits(proj_x: Tensor, target: Tensor, label_embeddings: Tensor, split_logits: bool = False) -> Tensor:
    """``proj_x (N, F)``, ``target (N,)`` class ids, ``label_embeddings (C, F)`` -> logits ``(N, C + 1)``.

    Column 0 is the target class. ``split_logits`` computes the class matmul in two chunks (Habana's
    iteration-2 memory saving), for any number of classes.
    """
    with torch.autocast(device_type=proj_x.device.type, enabled=False):
        x = _normalize(at_least_fp32(proj_x))
        emb = _normalize(at_least_fp32(label_embeddings))
        chunks = emb.split(math.ceil(len(emb) / 2)) if split_logits else (emb,)
        logits = torch.cat([x @ chunk.T for chunk in chunks], dim=1) / LOGIT_TEMP
        target = target.long()
        pos = logits.gather(1, target[:, None])
        with torch.no_grad():
            # Classes identical to the target's embedding, as upstream's ``(pos == negs).all(-1)``.
            same = (label_embeddings[:, None, :] == label_embeddings[None, :, :]).all(-1)
        neg_is_pos = same[target]
        logits = torch.where(neg_is_pos, float("-inf"), logits)
        return torch.cat([pos, logits], dim=1)


class LogitGenerator(nn.Module):
    """Final projection and label embeddings (uniform [0, 1) init as upstream, or standard normal).

    ``forward`` selects the masked and unmasked frames by boolean indexing (data-dependent shapes);
    ``all_frames`` scores every frame so that the masks select later and every shape is fixed.
    """

    def __init__(self, encoder_embed_dim: int, num_classes: int, final_dim: int, skip_masked: bool,
                 skip_nomask: bool, split_logits: bool = False, label_embedding_init: str = "uniform"):
        super().__init__()
        self.label_embeddings = nn.Parameter(torch.empty(num_classes, final_dim))
        if label_embedding_init == "uniform":
            nn.init.uniform_(self.label_embeddings)
        elif label_embedding_init == "normal":  # zero-mean: classes start nearly orthogonal, not parallel
            nn.init.normal_(self.label_embeddings)
        else:
            raise ValueError(f"label_embedding_init must be 'uniform' or 'normal', got {label_embedding_init!r}")
        self.final_proj = nn.Linear(encoder_embed_dim, final_dim)
        self.skip_masked = skip_masked
        self.skip_nomask = skip_nomask
        self.split_logits = split_logits

    def forward(self, x: Tensor, label: Tensor, mask_m: Tensor, mask_u: Tensor
                ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Logits of the masked and of the unmasked frames, ``(N_m, C + 1)`` and ``(N_u, C + 1)``."""
        proj_x = self.final_proj(x)
        logit_m = logit_u = None
        # One nonzero per mask (a device sync each), shared by the frames and their labels.
        if not self.skip_masked:
            idx = mask_m.nonzero(as_tuple=True)
            logit_m = compute_logits(proj_x[idx], label[idx], self.label_embeddings, self.split_logits)
        if not self.skip_nomask:
            idx = mask_u.nonzero(as_tuple=True)
            logit_u = compute_logits(proj_x[idx], label[idx], self.label_embeddings, self.split_logits)
        return logit_m, logit_u

    def all_frames(self, x: Tensor, label: Tensor) -> Tensor:
        """Logits of every frame, ``(B * T, C + 1)`` (the static path)."""
        proj_x = self.final_proj(x).flatten(0, 1)
        return compute_logits(proj_x, label.flatten(), self.label_embeddings, self.split_logits)
