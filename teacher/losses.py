"""Contrastive and distillation losses (spec section 3).

Dimension legend: B queries in this process, N documents in the (gathered) pool, D embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, d: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """One-directional InfoNCE query -> document: cross-entropy over ``scale * q @ d.T``.

    q: (B, D), d: (N, D) both L2-normalised; labels: (B,) index of each query's positive in d.
    scale = 1 / temperature (50 for the paper's 0.02).
    """
    logits = scale * q @ d.t()  # (B, N)
    return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), labels)


def matryoshka_info_nce(q_pooled, d_pooled, labels, scale: float, dims, weights=None) -> torch.Tensor:
    """Sum of InfoNCE losses on each truncated prefix, each re-normalised (Matryoshka, spec section 3).

    q_pooled: (B, D), d_pooled: (N, D) pooled but NOT normalised; dims e.g. (768, 256).
    """
    weights = weights or [1.0] * len(dims)
    total = q_pooled.new_zeros((), dtype=torch.float32)
    for dim, w in zip(dims, weights):
        q = F.normalize(q_pooled[:, :dim], dim=-1)
        d = F.normalize(d_pooled[:, :dim], dim=-1)
        total = total + w * info_nce(q, d, labels, scale)
    return total
