"""Distillation losses (student <- teacher), on pooled embeddings.

Dimension legend: B queries, N documents, d student dim, D teacher dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EMBEDDING_LOSSES = ("cosine", "mse")


def embedding_loss(s: torch.Tensor, t: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """s, t: (B, D) (student already projected to the teacher's dim), compared after L2 normalisation.
    cosine: mean(1 - cos); mse: mean squared distance of the unit vectors (= 2 * cosine loss)."""
    s, t = F.normalize(s.float(), dim=-1), F.normalize(t.float(), dim=-1)
    if kind == "cosine":
        return (1.0 - (s * t).sum(-1)).mean()
    if kind == "mse":
        return ((s - t) ** 2).sum(-1).mean()
    raise ValueError(f"unknown embedding loss {kind!r}; choose one of {', '.join(EMBEDDING_LOSSES)}")


def similarity_kl(s_q, s_d, t_q, t_d, temperature: float = 0.05) -> torch.Tensor:
    """In-batch score-distribution distillation: KL(teacher || student) over each query's row of
    softmax(q @ d.T / temperature). Works across dims (each side compares with itself)."""
    s_q, s_d = F.normalize(s_q.float(), dim=-1), F.normalize(s_d.float(), dim=-1)
    t_q, t_d = F.normalize(t_q.float(), dim=-1), F.normalize(t_d.float(), dim=-1)
    log_ps = F.log_softmax(s_q @ s_d.t() / temperature, dim=-1)  # (B, N)
    log_pt = F.log_softmax(t_q @ t_d.t() / temperature, dim=-1)  # (B, N)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")
