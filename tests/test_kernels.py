"""Fused MoE kernels (kernels/triton_moe.py) against their plain-PyTorch twins (kernels/ref.py).

On a machine without CUDA the Triton tests run under TRITON_INTERPRET=1 (set below, before triton is
first imported) with tiny shapes; they skip only when triton is not installed. Tolerances follow the
kind of check (house style rule 7): routing decisions, sort, counts and positions are bit-exact; fused
math must satisfy |fused - ref_hi| <= 2 |ref_lo - ref_hi| + eps, i.e. be no worse than twice the
reference's own rounding at the lower precision (fp32 vs fp64, bf16 vs fp32).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

from moe2edge import kernels  # noqa: E402
from moe2edge._optional import has  # noqa: E402
from moe2edge.kernels import ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = has("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed: pip install 'moe2edge[kernels]'")
# The CPU-tensor Triton tests need the interpreter; on a CUDA machine the gpu-marked test covers them.
needs_interp = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET), reason="needs triton under TRITON_INTERPRET=1 (set here when no CUDA)"
)


def tm():
    from moe2edge.kernels import triton_moe

    return triton_moe


def make_case(T, H, Fd, E, K, *, route="random", seed=0, dtype=torch.float32, device="cpu"):
    """Inputs of one MoE FFN call. route: random | one (all tokens to expert 0) | skip (experts >= 2
    of an odd index receive no token)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w1 = torch.randn(E, Fd, H, generator=g) * H**-0.5
    w2 = torch.randn(E, Fd, H, generator=g) * Fd**-0.5
    logits = torch.randn(T, E, generator=g)
    if route == "one":
        logits[:, 0] += 100.0
    elif route == "skip":
        logits[:, [e for e in range(E) if e % 2 == 1 and e >= 1]] -= 100.0
    _, weights, experts = ref.route_ref(logits, K)
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), weights.to(**to), experts.to(**to),
            w1.to(dtype=dtype, **to), w2.to(dtype=dtype, **to), logits.to(**to))


def assert_within(fused, ref_hi, ref_lo, *, rel_eps=1e-6, what=""):
    """|fused - ref_hi| <= 2 |ref_lo - ref_hi| + eps (eps relative to the output's scale)."""
    fused, ref_hi, ref_lo = fused.double(), ref_hi.double(), ref_lo.double()
    err = (fused - ref_hi).abs().max().item()
    bound = 2 * (ref_lo - ref_hi).abs().max().item() + rel_eps * ref_hi.abs().max().item() + 1e-12
    assert err <= bound, f"{what}: max|fused - ref| = {err:.3g} > bound {bound:.3g}"


# ----------------------------------------------------------------------------- dispatcher & imports


def test_import_never_needs_triton(tmp_path):
    code = (
        "import sys; sys.modules['triton'] = None\n"  # triton made unimportable
        "import torch, moe2edge.kernels as k\n"
        "from moe2edge._optional import MissingExtraError\n"
        "x = torch.randn(4, 8); w = torch.randn(2, 16, 8)\n"
        "_, wt, ex = k.route(torch.randn(4, 2), 1)\n"
        "assert k.backend_for(x) == 'ref'\n"
        "k.moe_mlp(x, wt, ex, w, w)\n"
        "import os; os.environ['MOE2EDGE_KERNELS'] = 'triton'\n"
        "try:\n    k.backend_for(x)\nexcept MissingExtraError as e:\n    assert 'moe2edge[kernels]' in str(e)\n"
        "else:\n    raise SystemExit('forcing triton without triton should fail')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MOE2EDGE_KERNELS"}
    # cwd elsewhere: a bare ./moe2edge (no kernels/) must not shadow the installed package
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)


def test_dispatcher_defaults_to_ref_on_cpu(monkeypatch):
    x = torch.randn(3, 8)
    monkeypatch.delenv("MOE2EDGE_KERNELS", raising=False)
    assert kernels.backend_for(x) == "ref"
    monkeypatch.setenv("MOE2EDGE_KERNELS", "ref")
    assert kernels.backend_for(x) == "ref"
    monkeypatch.setenv("MOE2EDGE_KERNELS", "bogus")
    with pytest.raises(ValueError, match="auto, ref, triton"):
        kernels.backend_for(x)
    if HAS_TRITON:
        monkeypatch.setenv("MOE2EDGE_KERNELS", "triton")
        assert kernels.backend_for(x) == "triton"


def test_moe_mlp_dispatch_equals_ref_on_cpu(monkeypatch):
    monkeypatch.delenv("MOE2EDGE_KERNELS", raising=False)
    x, w, e, w1, w2, logits = make_case(9, 16, 24, 4, 2)
    assert torch.equal(kernels.moe_mlp(x, w, e, w1, w2), ref.moe_mlp_ref(x, w, e, w1, w2))
    assert all(torch.equal(a, b) for a, b in zip(kernels.route(logits, 2), ref.route_ref(logits, 2)))


def test_sorted_ref_equals_loop_ref():
    """The fused path's decomposition (sort -> grouped MLP -> un-permute) is the loop reference's math."""
    x, w, e, w1, w2, _ = make_case(13, 8, 12, 4, 2, route="skip", dtype=torch.float64)
    torch.testing.assert_close(ref.moe_mlp_sorted_ref(x, w, e, w1, w2), ref.moe_mlp_ref(x, w, e, w1, w2))


# ------------------------------------------------------------------------- routing, sort: bit-exact

ROUTE_SHAPES = [(1, 2, 1), (17, 5, 2), (50, 8, 2), (33, 16, 4)]  # (T, E, K)


@needs_interp
@pytest.mark.parametrize("T,E,K", ROUTE_SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_route_matches_ref(T, E, K, normalize):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E))
    probs, weights, experts = tm().route_triton(logits, K, normalize)
    p_ref, w_ref, e_ref = ref.route_ref(logits, K, normalize)
    assert torch.equal(experts, e_ref)  # the routing decision: bit-exact
    # Softmax values: exp() differs by an ulp between Triton and torch's vectorised CPU/GPU libm.
    torch.testing.assert_close(probs, p_ref, rtol=2e-7, atol=1e-7)
    torch.testing.assert_close(weights, w_ref, rtol=2e-7, atol=1e-7)


@needs_interp
def test_route_backward_matches_ref():
    logits = torch.randn(19, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    gp, gw = torch.randn(19, 6), torch.randn(19, 2)
    grads = []
    for fn in (tm().route_triton, ref.route_ref):
        lg = logits.clone().requires_grad_()
        probs, weights, _ = fn(lg, 2, True)
        ((probs * gp).sum() + (weights * gw).sum()).backward()
        grads.append(lg.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


SORT_CASES = [  # (T, E, K, route): several 32-wide sort blocks, empty experts, all-to-one, tiny
    (1, 2, 1, "random"), (5, 3, 2, "random"), (50, 8, 2, "random"), (41, 6, 2, "skip"),
    (40, 4, 2, "one"), (70, 5, 3, "random"), (16, 64, 2, "random"),
]


@needs_interp
@pytest.mark.parametrize("T,E,K,route", SORT_CASES)
def test_sort_and_counts_bit_exact(T, E, K, route):
    _, _, experts, *_ = make_case(T, 4, 4, E, K, route=route, seed=T)
    got = tm().sort_by_expert_triton(experts, E)
    want = ref.sort_by_expert_ref(experts, E)
    for name, a, b in zip(("sorted_idx", "pos", "counts", "offsets"), got, want):
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b), name
    assert torch.equal(tm().expert_counts_triton(experts, E), ref.expert_counts_ref(experts, E))


@needs_interp
def test_unpermute_matches_ref():
    x, w, e, *_ = make_case(37, 8, 8, 5, 2, route="skip")
    sorted_idx, pos, _, _ = ref.sort_by_expert_ref(e, 5)
    y = torch.randn(37 * 2, 40, generator=torch.Generator().manual_seed(3))
    # fp32 sums of two products per element: same association as the reference -> equal
    torch.testing.assert_close(tm().unpermute_triton(y, pos, w), ref.unpermute_ref(y, pos, w), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ fused math

MLP_CASES = [  # (T, H, F, E, K, route)
    (1, 16, 16, 2, 1, "random"),       # tiny: one token, one block
    (37, 40, 72, 5, 2, "skip"),        # odd sizes (not multiples of 16), experts with zero tokens
    (24, 24, 40, 3, 2, "one"),         # every token's first choice is expert 0
]


@needs_interp
@pytest.mark.parametrize("T,H,Fd,E,K,route", MLP_CASES)
def test_grouped_mlp_forward(T, H, Fd, E, K, route):
    x, w, e, w1, w2, _ = make_case(T, H, Fd, E, K, route=route)
    sorted_idx, _, _, offsets = ref.sort_by_expert_ref(e, E)
    src = sorted_idx // K
    fused = tm().grouped_mlp_triton(x, src, offsets, w1, w2)
    hi = ref.grouped_mlp_ref(x.double(), src, offsets, w1.double(), w2.double())
    assert_within(fused, hi, ref.grouped_mlp_ref(x, src, offsets, w1, w2), what="grouped MLP fp32")


@needs_interp
@pytest.mark.parametrize("erf_poly", [True, False])
def test_gelu_epilogue_math_is_exact_erf(erf_poly):
    """The epilogues' GELU and GELU' (polynomial erf and libdevice erf) against fp64 erf: within fp32
    rounding (abs 3e-7 * max(1, |z|)), far below bf16 resolution; the far tail stays accurate."""
    from moe2edge.kernels import _triton_kernels as k

    z = torch.cat([torch.linspace(-12, 12, 4801), torch.tensor([0.0, 0.999 * 2**0.5, 2**0.5, 5.5 * 2**0.5])])
    N = z.numel()
    g, d = torch.empty(N), torch.empty(N)
    k.gelu_eval_kernel[(triton_cdiv(N, 1024),)](z, g, d, N, ERF_POLY=erf_poly, BLOCK=1024)
    z64 = z.double()
    cdf = 0.5 * torch.special.erfc(-z64 / 2**0.5)
    pdf = torch.exp(-0.5 * z64 * z64) / (2 * torch.pi) ** 0.5
    tol = 3e-7 * z64.abs().clamp(min=1)
    assert ((g.double() - z64 * cdf).abs() <= tol).all()
    assert ((d.double() - (cdf + z64 * pdf)).abs() <= tol).all()
    if erf_poly:  # no 1 + erf cancellation: the lower tail keeps its relative accuracy
        far = (z < -3) & (z > -7.7)  # |z| / sqrt 2 <= 5.5, where the fit is clamped
        assert ((g.double()[far] / (z64 * cdf)[far]) - 1).abs().max() < 1e-5


def triton_cdiv(a, b):
    return -(-a // b)


def _fwd_bwd(fn, x, w, e, w1, w2, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, w1, w2)]
    out = fn(leaves[0], leaves[1], e, leaves[2], leaves[3])
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


GRADS = ("out", "dx", "dweights", "dw1", "dw2")


@needs_interp
@pytest.mark.parametrize("T,H,Fd,E,K,route", MLP_CASES)
def test_moe_mlp_forward_backward_fp32(T, H, Fd, E, K, route):
    x, w, e, w1, w2, _ = make_case(T, H, Fd, E, K, route=route, seed=1)
    dout = torch.randn(T, H, generator=torch.Generator().manual_seed(2))
    fused = _fwd_bwd(tm().moe_mlp_triton, x, w, e, w1, w2, dout)
    lo = _fwd_bwd(ref.moe_mlp_ref, x, w, e, w1, w2, dout)
    hi = _fwd_bwd(ref.moe_mlp_ref, x.double(), w.double(), e, w1.double(), w2.double(), dout.double())
    for name, f, h, l in zip(GRADS, fused, hi, lo):
        assert f.dtype == l.dtype and f.shape == l.shape, name
        assert_within(f, h, l, what=name)
    if route == "skip":  # experts that got no token get exactly zero weight gradients
        unused = [i for i in range(E) if not (e == i).any()]
        assert unused and fused[3][unused].abs().max() == 0 and fused[4][unused].abs().max() == 0


@needs_interp
@pytest.mark.slow
def test_moe_mlp_forward_backward_bf16():
    T, H, Fd, E, K = 29, 32, 48, 4, 2
    x, w, e, w1, w2, _ = make_case(T, H, Fd, E, K, route="skip", seed=3, dtype=torch.bfloat16)
    dout = torch.randn(T, H, generator=torch.Generator().manual_seed(4))
    fused = _fwd_bwd(tm().moe_mlp_triton, x, w, e, w1, w2, dout)
    lo = _fwd_bwd(ref.moe_mlp_ref, x, w, e, w1, w2, dout)
    hi = _fwd_bwd(ref.moe_mlp_ref, x.float(), w, e, w1.float(), w2.float(), dout)
    for name, f, h, l in zip(GRADS, fused, hi, lo):
        assert f.dtype == l.dtype, name
        assert_within(f, h, l, rel_eps=1e-3, what=f"{name} bf16")


@needs_interp
def test_dispatcher_forced_triton(monkeypatch):
    monkeypatch.setenv("MOE2EDGE_KERNELS", "triton")
    x, w, e, w1, w2, logits = make_case(11, 16, 32, 3, 2, seed=5)
    assert kernels.backend_for(x) == "triton"
    _, w_t, e_t = kernels.route(logits, 2)
    assert torch.equal(e_t, e)
    assert torch.equal(kernels.expert_counts(e, 3), ref.expert_counts_ref(e, 3))
    out = kernels.moe_mlp(x, w, e, w1, w2)
    hi = ref.moe_mlp_ref(x.double(), w.double(), e, w1.double(), w2.double())
    assert_within(out, hi, ref.moe_mlp_ref(x, w, e, w1, w2), what="dispatcher")


@needs_interp
def test_inference_path_without_grad_matches():
    x, w, e, w1, w2, _ = make_case(10, 16, 16, 2, 2, seed=6)
    with torch.no_grad():  # save_z=False: no pre-activation kept
        out = tm().moe_mlp_triton(x, w, e, w1, w2)
    hi = ref.moe_mlp_ref(x.double(), w.double(), e, w1.double(), w2.double())
    assert_within(out, hi, ref.moe_mlp_ref(x, w, e, w1, w2), what="no-grad forward")


# --------------------------------------------------------------- torch.library registration, compile


@needs_interp
@pytest.mark.slow
def test_custom_ops_opcheck():
    x, w, e, w1, w2, logits = make_case(6, 16, 16, 2, 2, seed=7)
    torch.library.opcheck(torch.ops.moe2edge.route_topk.default, (logits.requires_grad_(), 2))
    torch.library.opcheck(
        torch.ops.moe2edge.moe_mlp_fwd.default,
        (x.requires_grad_(), w.requires_grad_(), e, w1.requires_grad_(), w2, True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@needs_interp
@pytest.mark.slow
def test_torch_compile_traces_the_fused_ops():
    """fullgraph=True: the custom ops and their fake functions trace without graph breaks."""
    torch._dynamo.reset()
    x, w, e, w1, w2, logits = make_case(8, 16, 16, 2, 2, seed=8)

    def layer(h, lg, w1, w2):
        _, wt, ex = tm().route_triton(lg, 2)
        return tm().moe_mlp_triton(h, wt, ex, w1, w2)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = _fwd_bwd(lambda h, lg, _e, a, b: compiled(h, lg, a, b), x, logits, e, w1, w2, torch.ones(8, 16))
    want = _fwd_bwd(lambda h, lg, _e, a, b: layer(h, lg, a, b), x, logits, e, w1, w2, torch.ones(8, 16))
    for name, a, b in zip(("out", "dx", "dlogits", "dw1", "dw2"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------ bench & GPU


@needs_interp
@pytest.mark.slow
def test_bench_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("moe_kernels_bench", ROOT / "bench" / "moe_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--dry-run", "--json", str(tmp_path / "b.json")])
    assert (tmp_path / "b.json").exists()
    assert all(n["ok"] for n in res["numerics"].values())
    assert {r["mode"] for r in res["rows"]} == {"fwd", "fwd+bwd"}
    assert all(f"{p}_ms" in r for r in res["rows"] for p in ("fused", "loop", "dense"))


GPU_CASES = [  # (T, H, F, E, K, route, autotune)
    (4096, 768, 3072, 8, 2, "random", True),   # the released shape
    (1000, 200, 328, 8, 2, "skip", False),     # odd sizes and empty experts, one fixed config
    (777, 768, 3072, 8, 2, "one", True),       # all tokens to one expert
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed: pip install 'moe2edge[kernels]'")
@pytest.mark.parametrize("T,H,Fd,E,K,route,autotune", GPU_CASES)
def test_gpu_fused_matches_ref_bf16(T, H, Fd, E, K, route, autotune, monkeypatch):
    monkeypatch.setenv("MOE2EDGE_AUTOTUNE", "1" if autotune else "0")
    monkeypatch.delenv("MOE2EDGE_KERNELS", raising=False)
    x, w, e, w1, w2, logits = make_case(T, H, Fd, E, K, route=route, device="cuda", dtype=torch.bfloat16)
    assert kernels.backend_for(x) == "triton"
    # routing on GPU: decisions and sort bit-exact
    _, w_t, e_t = kernels.route(logits, K)
    _, w_r, e_r = ref.route_ref(logits, K)
    assert torch.equal(e_t, e_r), "routing decisions differ"
    for a, b in zip(tm().sort_by_expert_triton(e, E), ref.sort_by_expert_ref(e, E)):
        assert torch.equal(a, b)
    dout = torch.randn(T, H, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    fused = _fwd_bwd(kernels.moe_mlp, x, w, e, w1, w2, dout)
    lo = _fwd_bwd(ref.moe_mlp_ref, x, w, e, w1, w2, dout)
    hi = _fwd_bwd(ref.moe_mlp_ref, x.float(), w, e, w1.float(), w2.float(), dout)
    for name, f, h, l in zip(GRADS, fused, hi, lo):
        assert torch.isfinite(f).all(), name
        assert_within(f, h, l, rel_eps=1e-3, what=f"{name} bf16 T={T}")
