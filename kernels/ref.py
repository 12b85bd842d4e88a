"""Plain-PyTorch reference twins of the MoE ops (house style rule 3).

These are the semantics every fused kernel is tested against, the path used on CPU, and the path
that ``torch.export`` / ONNX export traces (a fixed loop over experts with ``nonzero`` +
``index_select`` + ``index_put(accumulate=True)``: truly sparse, no data-dependent Python branch;
measured to export with dynamic batch and sequence, see ../shared/env-notes.md).

Dimension legend:
    T  tokens (batch x sequence, flattened)       H  hidden size
    E  experts                                     F  expert FFN size
    K  experts per token (top-k)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route_ref(logits: torch.Tensor, top_k: int, normalize: bool = False):
    """Router: softmax over all experts in float32, then top-k.

    logits: (T, E). Returns probs (T, E) fp32, weights (T, K) fp32, experts (T, K) int64.
    The released model does NOT renormalise the top-k weights (spec section 1); ``normalize=True``
    is the Mixtral-style variant (and what makes an upcycled model equal its dense parent).
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (T, E) fp32, as released
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (T, K), (T, K)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def expert_counts_ref(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, (E,) int64. experts: (T, K)."""
    return torch.bincount(experts.reshape(-1), minlength=num_experts)


def moe_mlp_ref(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of routed expert MLPs, WITHOUT the shared output bias.

    x: (T, H); weights, experts: (T, K); w1, w2: (E, F, H) -- both stored [F, H] per expert, w2 is
    applied un-transposed (spec section 2). Returns (T, H) in x's dtype:
        out_t = sum_j weights[t, j] * gelu(x_t @ w1[e_j].T) @ w2[e_j]
    Each expert sees only its own tokens (sparse compute, no capacity limit: dropless).
    """
    num_experts = w1.shape[0]
    out = torch.zeros_like(x)  # (T, H)
    for e in range(num_experts):
        hit = experts == e  # (T, K) bool
        tok = torch.nonzero(hit.any(dim=-1)).squeeze(-1)  # (n,) tokens routed to e (may be empty)
        gate = (weights * hit).sum(dim=-1).index_select(0, tok)  # (n,) fp32
        xe = x.index_select(0, tok)  # (n, H)
        ye = F.gelu(xe @ w1[e].t()) @ w2[e]  # (n, F) -> (n, H); exact erf GELU
        out = out.index_put((tok,), ye * gate.to(ye.dtype).unsqueeze(-1), accumulate=True)
    return out
