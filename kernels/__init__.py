"""MoE ops with a dispatcher: fused Triton kernels on CUDA, plain-PyTorch references elsewhere.

Import graph: ``kernels <- teacher <- student``. The teacher's MoE layer calls :func:`moe_mlp` and
:func:`route`; the implementation is picked per call from the input's device and what is installed,
so GPU training runs the fused path with no code change while CPU runs and export trace ``*_ref``.
Set ``MOE2EDGE_KERNELS=ref`` to force the references.
"""

from __future__ import annotations

import os

import torch

from .ref import expert_counts_ref, moe_mlp_ref, route_ref

__all__ = ["route", "moe_mlp", "expert_counts", "route_ref", "moe_mlp_ref", "expert_counts_ref", "backend_for"]


def _use_fused(x: torch.Tensor) -> bool:
    if os.environ.get("MOE2EDGE_KERNELS", "auto") == "ref":
        return False
    if not x.is_cuda or torch.compiler.is_exporting():
        return False
    from moe2edge._optional import has

    return has("triton") and has("moe2edge.kernels.triton_moe")


def backend_for(x: torch.Tensor) -> str:
    """Which implementation :func:`moe_mlp` will use for this input: "triton" or "ref"."""
    return "triton" if _use_fused(x) else "ref"


def route(logits: torch.Tensor, top_k: int, normalize: bool = False):
    """(probs fp32 (T,E), weights fp32 (T,K), experts int64 (T,K)). See :func:`route_ref`."""
    return route_ref(logits, top_k, normalize)


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    return expert_counts_ref(experts, num_experts)


def moe_mlp(x, weights, experts, w1, w2):
    """Routed expert MLPs without the shared bias. See :func:`moe_mlp_ref` for the exact math."""
    if _use_fused(x):
        from .triton_moe import moe_mlp_triton

        return moe_mlp_triton(x, weights, experts, w1, w2)
    return moe_mlp_ref(x, weights, experts, w1, w2)
