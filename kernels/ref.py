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
    b1: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum of routed expert MLPs, WITHOUT the shared output bias.

    x: (T, H); weights, experts: (T, K); w1, w2: (E, F, H) -- both stored [F, H] per expert, w2 is
    applied un-transposed (spec section 2). Returns (T, H) in x's dtype:
        out_t = sum_j weights[t, j] * gelu(x_t @ w1[e_j].T) @ w2[e_j]
    Each expert sees only its own tokens (sparse compute, no capacity limit: dropless).
    ``b1`` (E, F) is an optional per-expert fc1 bias; it is not in the released format (megablocks
    experts have none) and exists so that an upcycled model can keep its dense parent's fc1 bias.
    """
    num_experts = w1.shape[0]
    out = torch.zeros_like(x)  # (T, H)
    for e in range(num_experts):
        hit = experts == e  # (T, K) bool
        tok = torch.nonzero(hit.any(dim=-1)).squeeze(-1)  # (n,) tokens routed to e (may be empty)
        gate = (weights * hit).sum(dim=-1).index_select(0, tok)  # (n,) fp32
        xe = x.index_select(0, tok)  # (n, H)
        he = xe @ w1[e].t()  # (n, F)
        if b1 is not None:
            he = he + b1[e]
        ye = F.gelu(he) @ w2[e]  # (n, H); exact erf GELU
        out = out.index_put((tok,), ye * gate.to(ye.dtype).unsqueeze(-1), accumulate=True)
    return out


# ---------------------------------------------------------------------------------------------------
# Twins of the pieces of the fused path (kernels/triton_moe.py). Same signatures as the *_triton ops.
# "Sorted rows": the R = T*K (token, k) assignments ordered by expert, stably (flat order t*K + k
# within an expert). sorted_idx[r] is the flat assignment of sorted row r; pos is its inverse.


def sort_by_expert_ref(experts: torch.Tensor, num_experts: int):
    """Stable sort of the flat (T*K,) assignments by expert.

    Returns sorted_idx (R,) int64, pos (R,) int64 (pos[sorted_idx[r]] = r), counts (E,) int64,
    offsets (E+1,) int64 (expert e owns sorted rows offsets[e]:offsets[e+1]).
    """
    flat = experts.reshape(-1)  # (R,)
    sorted_idx = torch.sort(flat, stable=True).indices  # (R,)
    pos = torch.empty_like(sorted_idx)
    pos[sorted_idx] = torch.arange(flat.numel(), device=flat.device)
    counts = expert_counts_ref(experts, num_experts)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # (E+1,)
    return sorted_idx, pos, counts, offsets


def grouped_mlp_ref(
    x: torch.Tensor, src_rows: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """y[r] = gelu(x[src_rows[r]] @ w1[e].T) @ w2[e] for each sorted row r of expert e. Returns (R, H).

    x: (T, H); src_rows: (R,) token of each sorted row (sorted_idx // K); offsets: (E+1,).
    """
    xs = x.index_select(0, src_rows)  # (R, H): the permutation
    bounds = offsets.tolist()  # host sync: fine for a reference
    parts = [
        F.gelu(xs[bounds[e] : bounds[e + 1]] @ w1[e].t()) @ w2[e]  # (n_e, F) -> (n_e, H)
        for e in range(w1.shape[0])
    ]
    return torch.cat(parts, 0) if parts else xs.new_zeros(0, x.shape[1])


def unpermute_ref(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Un-permute with the weighted combine: out[t] = sum_k weights[t, k] * y[pos[t*K + k]].

    y: (R, H) sorted rows; pos: (R,); weights: (T, K). Sums in fp32, returns (T, H) in y's dtype.
    """
    T, K = weights.shape
    yk = y.index_select(0, pos).float().view(T, K, -1)  # (T, K, H)
    return (yk * weights.float().unsqueeze(-1)).sum(1).to(y.dtype)


def moe_mlp_sorted_ref(x, weights, experts, w1, w2):
    """moe_mlp_ref computed the fused path's way: sort -> grouped MLP -> weighted un-permute."""
    top_k = experts.shape[1]
    sorted_idx, pos, _, offsets = sort_by_expert_ref(experts, w1.shape[0])
    y = grouped_mlp_ref(x, sorted_idx // top_k, offsets, w1, w2)  # (R, H)
    return unpermute_ref(y, pos, weights)
