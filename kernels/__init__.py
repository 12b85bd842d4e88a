"""MoE ops with a dispatcher: fused Triton kernels on CUDA, plain-PyTorch references elsewhere.

Import graph: ``kernels <- teacher <- student``. The teacher's MoE layer calls :func:`moe_mlp` and
:func:`route`; the implementation is picked per call from the input's device and what is installed,
so GPU training runs the fused path with no code change while CPU runs and export trace ``*_ref``.
Importing this package never imports triton (it is an optional extra: ``moe2edge[kernels]``).

``MOE2EDGE_KERNELS`` picks the backend:
    auto (default)  Triton on CUDA when triton is installed, the reference otherwise
    ref             always the reference
    triton          always Triton, also on CPU (there only under ``TRITON_INTERPRET=1``: tests)
Under ``torch.export`` it is always the reference (the fixed expert loop that exports cleanly).
"""

from __future__ import annotations

import os

import torch

from .ref import (
    expert_counts_ref,
    grouped_mlp_ref,
    moe_mlp_ref,
    moe_mlp_sorted_ref,
    route_ref,
    sort_by_expert_ref,
    unpermute_ref,
)

__all__ = [
    "route",
    "moe_mlp",
    "expert_counts",
    "backend_for",
    "route_ref",
    "moe_mlp_ref",
    "expert_counts_ref",
    "sort_by_expert_ref",
    "grouped_mlp_ref",
    "unpermute_ref",
    "moe_mlp_sorted_ref",
]

BACKENDS = ("auto", "ref", "triton")


def _requested() -> str:
    mode = os.environ.get("MOE2EDGE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in BACKENDS:
        raise ValueError(f"MOE2EDGE_KERNELS={mode!r}: choose one of {', '.join(BACKENDS)}")
    return mode


def _use_fused(x: torch.Tensor) -> bool:
    mode = _requested()
    if mode == "ref" or torch.compiler.is_exporting():
        return False
    if mode == "triton":
        from moe2edge._optional import require

        require("triton", extra="kernels", purpose="MOE2EDGE_KERNELS=triton")
        return True
    if not x.is_cuda:
        return False
    from moe2edge._optional import has

    return has("triton") and has("moe2edge.kernels.triton_moe")


def backend_for(x: torch.Tensor) -> str:
    """Which implementation :func:`moe_mlp` will use for this input: "triton" or "ref"."""
    return "triton" if _use_fused(x) else "ref"


def route(logits: torch.Tensor, top_k: int, normalize: bool = False):
    """(probs fp32 (T,E), weights fp32 (T,K), experts int64 (T,K)). See :func:`route_ref`."""
    if _use_fused(logits):
        from .triton_moe import route_triton

        return route_triton(logits, top_k, normalize)
    return route_ref(logits, top_k, normalize)


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, (E,) int64. See :func:`expert_counts_ref`."""
    if _use_fused(experts):
        from .triton_moe import expert_counts_triton

        return expert_counts_triton(experts, num_experts)
    return expert_counts_ref(experts, num_experts)


def moe_mlp(x, weights, experts, w1, w2, b1=None):
    """Routed expert MLPs without the shared bias. See :func:`moe_mlp_ref` for the exact math.

    ``b1`` (optional per-expert fc1 bias, an upcycling extension) is served by the reference only.
    """
    if b1 is not None:
        return moe_mlp_ref(x, weights, experts, w1, w2, b1)
    if _use_fused(x):
        from .triton_moe import moe_mlp_triton

        return moe_mlp_triton(x, weights, experts, w1, w2)
    return moe_mlp_ref(x, weights, experts, w1, w2)
