"""Fused MoE path in Triton: route -> stable sort by expert -> grouped expert MLP -> weighted combine.

Each public function has a plain-PyTorch twin of the same signature in ``ref.py``:

    route_triton            <-> route_ref               softmax (fp32) -> top-k
    expert_counts_triton    <-> expert_counts_ref       assignments per expert
    sort_by_expert_triton   <-> sort_by_expert_ref      stable counting sort of the (t, k) assignments
    grouped_mlp_triton      <-> grouped_mlp_ref         gather -> GEMM -> erf GELU -> GEMM per expert group
    unpermute_triton        <-> unpermute_ref           weighted combine back to token order
    moe_mlp_triton          <-> moe_mlp_ref             all of the above, forward and backward

The MoE FFN and the router are ``torch.library.custom_op``s (namespace ``moe2edge``) with fake
(shape) functions and autograd formulas, so ``torch.compile`` traces them as opaque nodes.
``torch.export`` never reaches this file: the dispatcher in ``__init__`` sends export to ``*_ref``.

Data flow of one forward (R = T*K sorted rows; nothing is copied into expert order but indices):
    sort:   experts (T,K) -> sorted_idx (R,), pos (R,), offsets (E+1,)     [histogram + scatter]
    GEMM1:  h[r] = gelu(x[sorted_idx[r] // K] @ w1[e].T)  (R,F)             [gather fused in A-load]
    GEMM2:  y[r] = h[r] @ w2[e]                          (R,H)
    combine out[t] = sum_k weights[t,k] * y[pos[t*K+k]] (T,H)               [gates fused, no atomics]
Backward reuses the same two kernels (dz = (g * dout[tok]) @ w2[e].T * gelu'(z); dxs = dz @ w1[e]),
a grouped weight-gradient kernel (dw1[e] = dz_e^T x_e, dw2[e] = h_e^T (g * dout)_e) and a row-dot
kernel for the gates (dg[t,k] = <dout[t], y[pos]>).

Dimension legend:
    T  tokens                 H  hidden size            F  expert FFN size
    E  experts                K  experts per token      R  = T*K routed rows, sorted by expert
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from moe2edge._optional import require

triton = require("triton", extra="kernels", purpose="the fused MoE kernels")

from . import _triton_kernels as _k  # noqa: E402  (after the optional-dependency check)

__all__ = [
    "route_triton",
    "expert_counts_triton",
    "sort_by_expert_triton",
    "grouped_mlp_triton",
    "unpermute_triton",
    "moe_mlp_triton",
]


def _interpret() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU in numpy; one small config, no autotuning."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int, lo: int = 2) -> int:
    return max(lo, triton.next_power_of_2(n))


# Small blocks in the interpreter: every launch is ~100 ms of Python, and 16 exercises the masks
# and the multi-block paths on tiny test shapes. 16 is tl.dot's minimum block dim.
_INTERP_GEMM = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
_INTERP_WGRAD = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)


def _gemm_configs():
    # Hopper bf16 candidates (wgmma wants BLOCK_M >= 64 and 4 or 8 warps). Shared memory per stage is
    # (BM*BK + BK*BN) * 2 bytes: the biggest, 128x256x64 x 3 stages, is 144 KiB < 227 KiB. Configs
    # that do not fit (e.g. fp32 inputs) raise OutOfResources, which the autotuner skips.
    C = triton.Config
    return [
        C(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
        C(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=3),
        C(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=3),
        # 96 KiB of stages: two programs fit one SM, so one's GELU epilogue and stores overlap the
        # other's main loop (GEMM1 and the dz GEMM have a short K = H = 768: 12 iterations per tile).
        C(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=3),
        C(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
        C(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
    ]


def _wgrad_configs():
    C = triton.Config
    return [
        C(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), num_warps=4, num_stages=4),
        C(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), num_warps=8, num_stages=3),
        C(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), num_warps=8, num_stages=3),
        C(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), num_warps=4, num_stages=4),
    ]


_TUNED: dict[str, object] = {}


def _tuned(name: str):
    """Autotuned wrappers, built on first GPU use (never in the interpreter)."""
    if name not in _TUNED:
        if name == "gemm":
            _TUNED[name] = triton.autotune(
                configs=_gemm_configs(), key=["N", "K", "EPI", "GATHER", "HAS_SCALE", "IEEE"]
            )(_k.grouped_gemm_kernel)
        else:
            _TUNED[name] = triton.autotune(configs=_wgrad_configs(), key=["M", "N", "HAS_SCALE", "IEEE"])(
                _k.grouped_wgrad_kernel
            )
    return _TUNED[name]


def _autotune_on() -> bool:
    """MOE2EDGE_AUTOTUNE=0 runs the first config of each list, untuned (quick checks, odd shapes)."""
    return os.environ.get("MOE2EDGE_AUTOTUNE", "1") != "0"


def _first(configs) -> dict:
    c = configs[0]
    return dict(**c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _erf_poly() -> bool:
    """GELU's erf: MOE2EDGE_GELU_ERF=libdevice (default; tl.erf) or poly (_phi_tail: polynomials + one
    exp, no branch). Both are exact-erf GELU to fp32 rounding; only the cost differs. On an H200
    (triton 3.6, bf16, H 768, F 3072) GEMM1 took 1.81 ms with libdevice and 2.06 ms with poly at
    131072 rows (0.58 vs 0.69 ms at 32768): libdevice's erff is already cheap, so it stays the default."""
    v = os.environ.get("MOE2EDGE_GELU_ERF", "libdevice")
    if v not in ("poly", "libdevice"):
        raise ValueError(f"MOE2EDGE_GELU_ERF={v!r}: expected poly or libdevice")
    return v == "poly"


def tuned_configs() -> dict:
    """The autotuner's picks so far, {kernel: {key: config}} as strings (for the benchmark's report)."""
    return {n: {str(k): str(c) for k, c in getattr(t, "cache", {}).items()} for n, t in _TUNED.items()}


def _dot_flags(dtype: torch.dtype) -> dict:
    interp = _interpret()
    return dict(UPCAST=interp, IEEE=(dtype == torch.float32) or interp)


# --------------------------------------------------------------------------------------- launchers


def _route_launch(logits: Tensor, top_k: int):
    T, E = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    probs = torch.empty(T, E, device=logits.device, dtype=torch.float32)
    weights = torch.empty(T, top_k, device=logits.device, dtype=torch.float32)
    experts = torch.empty(T, top_k, device=logits.device, dtype=torch.int64)
    if T == 0:
        return probs, weights, experts
    E_P2 = _pow2(E)
    block_t = 16 if _interpret() else max(16, min(128, 4096 // E_P2))
    _k.route_kernel[(triton.cdiv(T, block_t),)](
        logits, probs, weights, experts, T, E, logits.stride(0), TOP_K=top_k, E_P2=E_P2, BLOCK_T=block_t
    )
    return probs, weights, experts


def _sort_block(E_P2: int) -> int:
    if _interpret():
        return 32  # several blocks even on tiny tests: exercises the cross-block prefix
    return max(64, min(1024, 16384 // E_P2))  # the (BLOCK, E_P2) one-hot stays ~16k elements


def _block_counts(flat: Tensor, num_experts: int) -> tuple[Tensor, int, int]:
    E_P2 = _pow2(num_experts)
    block = _sort_block(E_P2)
    nb = triton.cdiv(flat.numel(), block)
    bc = torch.empty(nb, num_experts, device=flat.device, dtype=torch.int64)  # (NB, E)
    if nb:
        _k.histogram_kernel[(nb,)](flat, bc, flat.numel(), num_experts, E_P2=E_P2, BLOCK=block)
    return bc, E_P2, block


def expert_counts_triton(experts: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert, (E,) int64. experts: (T, K). Bit-exact twin of expert_counts_ref."""
    bc, _, _ = _block_counts(experts.reshape(-1).contiguous(), num_experts)
    return bc.sum(0)


def _sort(experts: Tensor, num_experts: int, top_k: int | None):
    """sort_by_expert_triton's work; with top_k also src = sorted_idx // top_k (written by the scatter)."""
    flat = experts.reshape(-1).contiguous()  # (R,)
    N = flat.numel()
    bc, E_P2, block = _block_counts(flat, num_experts)  # (NB, E)
    NB = bc.shape[0]
    dev = flat.device
    counts = torch.empty(num_experts, device=dev, dtype=torch.int64)
    offsets = torch.empty(num_experts + 1, device=dev, dtype=torch.int64)
    base = torch.empty(NB, num_experts, device=dev, dtype=torch.int64)  # (NB, E) first destinations
    if NB == 0:
        counts.zero_()
        offsets.zero_()
    else:
        block_b = 16 if _interpret() else max(16, min(256, 8192 // E_P2))
        _k.expert_prefix_kernel[(1,)](bc, base, counts, offsets, NB, num_experts, E_P2=E_P2, BLOCK_B=block_b)
    sorted_idx = torch.empty(N, device=dev, dtype=torch.int64)
    pos = torch.empty(N, device=dev, dtype=torch.int64)
    src = torch.empty(N if top_k else 0, device=dev, dtype=torch.int64)
    if N:
        _k.scatter_sorted_kernel[(NB,)](
            flat, base, sorted_idx, pos, src if top_k else pos, N, num_experts, top_k or 1,
            E_P2=E_P2, BLOCK=block, WRITE_SRC=bool(top_k),
        )
    return sorted_idx, pos, counts, offsets, src


def sort_by_expert_triton(experts: Tensor, num_experts: int):
    """Stable counting sort of the flat (R,) assignments by expert; see sort_by_expert_ref.

    Three Triton launches: per-block histogram, a one-program prefix sum (counts, offsets and each
    block's first destinations), then per-block ranks via a cumsum over a one-hot. No host sync, so it
    is safe under torch.compile and CUDA graphs. Returns sorted_idx (R,), pos (R,), counts (E,),
    offsets (E+1,), all int64.
    """
    return _sort(experts, num_experts, None)[:4]


def _grouped_gemm(
    a: Tensor, a_rows: Tensor | None, b: Tensor, b_strides: tuple[int, int, int], offsets: Tensor,
    out: Tensor, N: int, K: int, *, scale: Tensor | None = None, z: Tensor | None = None,
    epi: int = 0, store_z: bool = False, erf_poly: bool | None = None,
) -> Tensor:
    """out[r, :N] = epi(scale[r] * a[a_rows[r], :K] @ B[e(r)]), B[e][k, n] = b[e*s0 + k*s1 + n*s2]."""
    R = out.shape[0]
    E = offsets.numel() - 1
    assert out.shape[1] == N and a.shape[1] == K and out.stride(1) == 1, "grouped GEMM shape mismatch"
    if z is not None and (epi == 2 or store_z):
        assert z.shape == out.shape and z.stride() == out.stride(), "z must be laid out like out"
    if R == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()  # empty reduction; gelu(0) = 0 too
    dummy = out
    args = (
        a, a_rows if a_rows is not None else dummy, b, out, z if z is not None else dummy,
        scale if scale is not None else dummy, offsets,
        R, N, K, E,
        a.stride(0), a.stride(1), b_strides[0], b_strides[1], b_strides[2], out.stride(0), out.stride(1),
    )
    flags = dict(
        GATHER=a_rows is not None, HAS_SCALE=scale is not None, EPI=epi, STORE_Z=store_z,
        E_P2=_pow2(E), ERF_POLY=_erf_poly() if erf_poly is None else erf_poly, **_dot_flags(a.dtype),
    )

    def grid(meta):
        return ((triton.cdiv(R, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)

    if _interpret():
        _k.grouped_gemm_kernel[grid](*args, **flags, **_INTERP_GEMM)
    elif not _autotune_on():
        _k.grouped_gemm_kernel[grid](*args, **flags, **_first(_gemm_configs()))
    else:
        _tuned("gemm")[grid](*args, **flags)
    return out


def _grouped_wgrad(a: Tensor, b: Tensor, b_rows: Tensor, offsets: Tensor, out: Tensor, *, scale=None) -> Tensor:
    """out[e] = sum_{r in e} a[r, :]^T (x) (scale[r] * b[b_rows[r], :]); out: (E, M, N)."""
    E, M, N = out.shape
    assert a.shape[1] == M and b.shape[1] == N and offsets.numel() == E + 1, "grouped wgrad shape mismatch"
    if out.numel() == 0:
        return out
    args = (
        a, b, b_rows, scale if scale is not None else out, offsets, out, M, N, E,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
    )
    flags = dict(HAS_SCALE=scale is not None, **_dot_flags(a.dtype))

    def grid(meta):
        return (E * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if _interpret():
        _k.grouped_wgrad_kernel[grid](*args, **flags, **_INTERP_WGRAD)
    elif not _autotune_on():
        _k.grouped_wgrad_kernel[grid](*args, **flags, **_first(_wgrad_configs()))
    else:
        _tuned("wgrad")[grid](*args, **flags)
    return out


def _combine_blocks() -> tuple[int, int]:
    return (16, 32) if _interpret() else (32, 128)


def _combine(y: Tensor, pos: Tensor, weights: Tensor | None, T: int, top_k: int, out_dtype) -> Tensor:
    R, H = y.shape
    assert R == T * top_k and y.stride(1) == 1 and y.stride(0) == H
    out = torch.empty(T, H, device=y.device, dtype=out_dtype)
    if T == 0 or H == 0:
        return out
    bt, bh = _combine_blocks()
    _k.combine_kernel[(triton.cdiv(T, bt), triton.cdiv(H, bh))](
        y, pos, weights if weights is not None else y, out, T, H,
        TOP_K=top_k, HAS_W=weights is not None, BLOCK_T=bt, BLOCK_H=bh,
    )
    return out


def unpermute_triton(y: Tensor, pos: Tensor, weights: Tensor) -> Tensor:
    """Weighted combine back to token order, (T, H) in y's dtype. Twin of unpermute_ref."""
    T, K = weights.shape
    return _combine(y.contiguous(), pos, weights.float().contiguous(), T, K, y.dtype)


def _gate_grad(dout: Tensor, y: Tensor, pos: Tensor, T: int, top_k: int) -> Tensor:
    dw = torch.empty(T, top_k, device=y.device, dtype=torch.float32)
    if T == 0:
        return dw
    bt, bh = _combine_blocks()
    _k.gate_grad_kernel[(triton.cdiv(T, bt), top_k)](dout, y, pos, dw, T, y.shape[1], TOP_K=top_k, BLOCK_T=bt, BLOCK_H=bh)
    return dw


def _w_kn(w: Tensor, transpose: bool) -> tuple[int, int, int]:
    """Strides that address w[e] (F, H) as a (K, N) GEMM operand: w[e].T if transpose else w[e]."""
    s_e, s_f, s_h = w.stride()
    return (s_e, s_h, s_f) if transpose else (s_e, s_f, s_h)


def _gemm1(x, src, w1, offsets, store_z: bool, erf_poly: bool | None = None):
    R, Fd, H = src.numel(), w1.shape[1], x.shape[1]
    h = torch.empty(R, Fd, device=x.device, dtype=x.dtype)
    z = torch.empty(R if store_z else 0, Fd, device=x.device, dtype=x.dtype)
    _grouped_gemm(x, src, w1, _w_kn(w1, True), offsets, h, Fd, H, z=z if store_z else None, epi=1,
                  store_z=store_z, erf_poly=erf_poly)
    return h, z


def grouped_mlp_triton(x: Tensor, src_rows: Tensor, offsets: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """y[r] = gelu(x[src_rows[r]] @ w1[e].T) @ w2[e] per sorted row r of expert e, (R, H). Forward only;
    twin of grouped_mlp_ref."""
    h, _ = _gemm1(x, src_rows, w1, offsets, store_z=False)
    y = torch.empty(src_rows.numel(), x.shape[1], device=x.device, dtype=x.dtype)
    return _grouped_gemm(h, None, w2, _w_kn(w2, False), offsets, y, x.shape[1], w1.shape[1])


# ------------------------------------------------------------------------------ registered custom ops


@torch.library.custom_op("moe2edge::route_topk", mutates_args=())
def _route_op(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    return _route_launch(logits, top_k)


@_route_op.register_fake
def _(logits, top_k):
    T, E = logits.shape
    return (
        logits.new_empty(T, E, dtype=torch.float32),
        logits.new_empty(T, top_k, dtype=torch.float32),
        logits.new_empty(T, top_k, dtype=torch.int64),
    )


def _route_setup(ctx, inputs, output):
    probs, _, experts = output
    ctx.save_for_backward(probs, experts)
    ctx.logits_dtype = inputs[0].dtype


def _route_backward(ctx, dprobs, dweights, _dexperts):
    # weights = probs.gather(experts): its gradient lands on probs; then the softmax backward.
    probs, experts = ctx.saved_tensors
    g = dprobs if dprobs is not None else torch.zeros_like(probs)
    if dweights is not None:
        g = g.scatter_add(1, experts, dweights.float())
    dlogits = probs * (g - (probs * g).sum(-1, keepdim=True))  # (T, E)
    return dlogits.to(ctx.logits_dtype), None


_route_op.register_autograd(_route_backward, setup_context=_route_setup)


def route_triton(logits: Tensor, top_k: int, normalize: bool = False):
    """Twin of route_ref: (probs fp32 (T,E), weights fp32 (T,K), experts int64 (T,K)), differentiable."""
    probs, weights, experts = torch.ops.moe2edge.route_topk(logits, top_k)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


@torch.library.custom_op("moe2edge::moe_mlp_fwd", mutates_args=())
def _moe_mlp_fwd(
    x: Tensor, weights: Tensor, experts: Tensor, w1: Tensor, w2: Tensor, save_z: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, sorted_idx, pos, offsets, h, z, y); all but out are residuals for the backward."""
    T, H = x.shape
    K = experts.shape[1]
    sorted_idx, pos, _, offsets, src = _sort(experts, w1.shape[0], K)  # src (R,): token of each sorted row
    h, z = _gemm1(x, src, w1, offsets, store_z=save_z)  # (R, F) each
    y = torch.empty(T * K, H, device=x.device, dtype=x.dtype)
    _grouped_gemm(h, None, w2, _w_kn(w2, False), offsets, y, H, w1.shape[1])  # (R, H)
    out = _combine(y, pos, weights, T, K, x.dtype)  # (T, H)
    return out, sorted_idx, pos, offsets, h, z, y


@_moe_mlp_fwd.register_fake
def _(x, weights, experts, w1, w2, save_z):
    T, H = x.shape
    R, Fd, E = T * experts.shape[1], w1.shape[1], w1.shape[0]
    idx = x.new_empty(R, dtype=torch.int64)
    return (
        x.new_empty(T, H), idx, idx.new_empty(R), idx.new_empty(E + 1),
        x.new_empty(R, Fd), x.new_empty(R if save_z else 0, Fd), x.new_empty(R, H),
    )


@torch.library.custom_op("moe2edge::moe_mlp_bwd", mutates_args=())
def _moe_mlp_bwd(
    dout: Tensor, x: Tensor, weights: Tensor, w1: Tensor, w2: Tensor,
    sorted_idx: Tensor, pos: Tensor, offsets: Tensor, h: Tensor, z: Tensor, y: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweights, dw1, dw2) of moe_mlp_fwd's first output."""
    T, H = x.shape
    K = weights.shape[1]
    E, Fd, _ = w1.shape
    dout = dout.to(x.dtype).contiguous()
    src = sorted_idx // K
    gate = weights.reshape(-1).index_select(0, sorted_idx).float().contiguous()  # (R,) gate per sorted row
    if z.shape[0] != h.shape[0]:  # forward ran without save_z: recompute the pre-activation
        _, z = _gemm1(x, src, w1, offsets, store_z=True)
    dz = torch.empty_like(h)  # (R, F)
    _grouped_gemm(dout, src, w2, _w_kn(w2, True), offsets, dz, Fd, H, scale=gate, z=z, epi=2)
    dxs = torch.empty(T * K, H, device=x.device, dtype=x.dtype)
    _grouped_gemm(dz, None, w1, _w_kn(w1, False), offsets, dxs, H, Fd)  # (R, H)
    dx = _combine(dxs, pos, None, T, K, x.dtype)
    dw2 = _grouped_wgrad(h, dout, src, offsets, torch.empty(E, Fd, H, device=x.device, dtype=w2.dtype), scale=gate)
    dw1 = _grouped_wgrad(dz, x, src, offsets, torch.empty(E, Fd, H, device=x.device, dtype=w1.dtype))
    dweights = _gate_grad(dout, y, pos, T, K).to(weights.dtype)
    return dx, dweights, dw1, dw2


@_moe_mlp_bwd.register_fake
def _(dout, x, weights, w1, w2, sorted_idx, pos, offsets, h, z, y):
    return torch.empty_like(x), torch.empty_like(weights), torch.empty_like(w1), torch.empty_like(w2)


def _moe_setup(ctx, inputs, output):
    x, weights, _, w1, w2, _ = inputs
    _, sorted_idx, pos, offsets, h, z, y = output
    ctx.save_for_backward(x, weights, w1, w2, sorted_idx, pos, offsets, h, z, y)


def _moe_backward(ctx, dout, *_residual_grads):
    dx, dweights, dw1, dw2 = torch.ops.moe2edge.moe_mlp_bwd(dout, *ctx.saved_tensors)
    return dx, dweights, None, dw1, dw2, None


_moe_mlp_fwd.register_autograd(_moe_backward, setup_context=_moe_setup)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError):  # older torch without the device_type overloads
        pass
    return None


def moe_mlp_triton(x: Tensor, weights: Tensor, experts: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """Fused twin of moe_mlp_ref: sum_k weights[t,k] * gelu(x_t @ w1[e].T) @ w2[e], no shared bias.

    x: (T, H); weights fp32 (T, K); experts int64 (T, K); w1, w2: (E, F, H). Returns (T, H) in x's
    dtype. Under autocast, the math runs in the autocast dtype (like the reference's matmuls).
    """
    if x.dim() != 2 or w1.dim() != 3 or w1.shape != w2.shape or w1.shape[2] != x.shape[1]:
        raise ValueError(f"moe_mlp_triton: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if weights.shape != experts.shape or weights.shape[0] != x.shape[0]:
        raise ValueError(f"moe_mlp_triton: weights {tuple(weights.shape)}, experts {tuple(experts.shape)}")
    cd = _autocast_dtype(x.device.type) or x.dtype
    xc, w1c, w2c = x.to(cd), w1.to(cd), w2.to(cd)  # no-ops when dtypes already match
    wts = weights.float().contiguous()
    save_z = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w1, w2))
    out = torch.ops.moe2edge.moe_mlp_fwd(xc, wts, experts.long().contiguous(), w1c, w2c, save_z)[0]
    return out  # (T, H) in x's dtype, or the autocast dtype under autocast
