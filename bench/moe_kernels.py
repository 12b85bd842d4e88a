"""Benchmark the MoE FFN: fused Triton path vs the per-expert loop vs a dense GEMM pair (the roof).

    (a) fused     moe_mlp_triton: counting sort -> grouped GEMM (gather fused) -> GELU -> grouped GEMM
                  -> weighted un-permute
    (b) loop      moe_mlp_ref: the released inference code's per-expert Python loop
    (c) dense     one GEMM pair with the same active FLOPs: gelu(x[T*K, H] @ w1[0].T) @ w2[0] (cuBLAS)

FLOPs counted: forward 2 GEMMs x 2*(T*K)*H*F; forward+backward 3x that. Times are medians of CUDA-event
timed runs after warm-up (the warm-up also absorbs Triton's autotuning).

    python bench/moe_kernels.py                      # released shape: H 768, F 3072, E 8, top-2, bf16
    python bench/moe_kernels.py --json out.json      # also write the rows as JSON ($OUT/moe_kernels.json
                                                     # by default when $OUT is set)
    TRITON_INTERPRET=1 python bench/moe_kernels.py --dry-run   # tiny shapes on CPU (CI)

Dimension legend: T tokens, H hidden, F expert FFN, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

log = logging.getLogger("bench.moe_kernels")

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--breakdown", action="store_true", help="also time the fused path's pieces (forward)")
    p.add_argument("--json", default=None, help="write the results here (default: $OUT/moe_kernels.json)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    if args.dry_run:
        args.tokens, args.hidden, args.ffn, args.experts, args.top_k = [24], 32, 48, 4, 2
        args.dtype, args.warmup, args.iters = "fp32", 0, 1
    if args.json is None and os.environ.get("OUT"):
        args.json = os.path.join(os.environ["OUT"], "moe_kernels.json")
    return args


def _timer(device):
    """Median milliseconds of fn() over iters runs after warmup runs (CUDA events on GPU)."""
    import torch

    def run(fn, warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return run


def _paths(T: int, args, device, dtype):
    """The three paths as (name, forward fn, forward+backward fn) on the same routed inputs."""
    import torch
    import torch.nn.functional as F

    from moe2edge.kernels import moe_mlp_ref, route_ref
    from moe2edge.kernels.triton_moe import moe_mlp_triton

    H, Fd, E, K = args.hidden, args.ffn, args.experts, args.top_k
    g = torch.Generator(device="cpu").manual_seed(T)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    w1 = (torch.randn(E, Fd, H, generator=g) * H**-0.5).to(device, dtype)
    w2 = (torch.randn(E, Fd, H, generator=g) * Fd**-0.5).to(device, dtype)
    logits = torch.randn(T, E, generator=g).to(device)
    _, weights, experts = route_ref(logits, K)  # (T, K) fp32, (T, K) int64: roughly balanced
    dout = torch.randn(T, H, generator=g).to(device, dtype)
    xd = torch.randn(T * K, H, generator=g).to(device, dtype)  # the dense roof's T*K rows
    leaves = [t.requires_grad_() for t in (x, w1, w2, xd)]
    weights.requires_grad_()

    def dense(inp):
        return F.linear(F.gelu(F.linear(inp, w1[0])), w2[0].t())  # (T*K, F) -> (T*K, H)

    fns = {
        "fused": lambda: moe_mlp_triton(x, weights, experts, w1, w2),
        "loop": lambda: moe_mlp_ref(x, weights, experts, w1, w2),
        "dense": lambda: dense(xd),
    }

    def fwd(f):
        def run():
            with torch.no_grad():
                f()

        return run

    def fwd_bwd(name, f):
        grad = dout if name != "dense" else torch.ones(T * K, H, device=device, dtype=dtype)

        def run():
            for t in leaves + [weights]:
                t.grad = None
            f().backward(grad)

        return run

    return {n: (fwd(f), fwd_bwd(n, f)) for n, f in fns.items()}, (x, weights, experts, w1, w2)


def breakdown(inputs, timer, warmup: int, iters: int) -> dict:
    """Forward pieces of the fused path, ms each: sort (+ src), GEMM1 (+gather, GELU with libdevice's
    erf, the default), GEMM1 with the polynomial erf (same autotuner pick), GEMM2, combine."""
    import torch

    from moe2edge.kernels import triton_moe as tm

    x, weights, experts, w1, w2 = (t.detach() for t in inputs)
    K = experts.shape[1]
    _, pos, _, offsets, src = tm._sort(experts, w1.shape[0], K)
    h, _ = tm._gemm1(x, src, w1, offsets, store_z=False)
    y = torch.empty(src.numel(), x.shape[1], device=x.device, dtype=x.dtype)
    gemm2 = lambda: tm._grouped_gemm(h, None, w2, tm._w_kn(w2, False), offsets, y, x.shape[1], w1.shape[1])  # noqa: E731
    pieces = {
        "sort": lambda: tm._sort(experts, w1.shape[0], K),
        "gemm1": lambda: tm._gemm1(x, src, w1, offsets, store_z=False, erf_poly=False),
        "gemm1_poly_erf": lambda: tm._gemm1(x, src, w1, offsets, store_z=False, erf_poly=True),
        "gemm2": gemm2,
        "combine": lambda: tm._combine(y, pos, weights.float(), x.shape[0], K, x.dtype),
    }
    return {name: timer(f, warmup, iters) for name, f in pieces.items()}


def check_numerics(inputs) -> dict:
    """max |fused - ref_fp32| against the bound 2 * max |ref_lowp - ref_fp32| (+ eps) on the bench inputs."""
    import torch

    from moe2edge.kernels import moe_mlp_ref
    from moe2edge.kernels.triton_moe import moe_mlp_triton

    x, weights, experts, w1, w2 = inputs
    with torch.no_grad():
        ref32 = moe_mlp_ref(x.float(), weights, experts, w1.float(), w2.float())
        ref_lp = moe_mlp_ref(x, weights, experts, w1, w2).float()
        fused = moe_mlp_triton(x, weights, experts, w1, w2).float()
    err = (fused - ref32).abs().max().item()
    bound = 2 * (ref_lp - ref32).abs().max().item() + 1e-5 * ref32.abs().max().item()
    return {"max_err_fused": err, "max_err_ref_lowp": (ref_lp - ref32).abs().max().item(), "bound": bound, "ok": err <= bound}


def run(args) -> dict:
    import torch

    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA GPU: use --dry-run (tiny shapes under TRITON_INTERPRET=1)")
    dtype = getattr(torch, DTYPES[args.dtype])
    timer = _timer(device)
    modes = ["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]
    import triton

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": dict(hidden=args.hidden, ffn=args.ffn, experts=args.experts, top_k=args.top_k, dtype=args.dtype),
        "numerics": {},
        "rows": [],
    }
    for T in args.tokens:
        paths, inputs = _paths(T, args, device, dtype)
        try:
            result["numerics"][str(T)] = check_numerics(inputs)
        except Exception as e:  # keep timing the other shapes; the failure is in the report
            result["numerics"][str(T)] = {"error": f"{type(e).__name__}: {e}"}
        if args.breakdown:
            try:
                bd = breakdown(inputs, timer, args.warmup, args.iters)
                result.setdefault("breakdown_ms", {})[str(T)] = bd
                print(f"T={T} fused forward pieces (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in bd.items()))
            except Exception as e:
                result.setdefault("breakdown_ms", {})[str(T)] = {"error": f"{type(e).__name__}: {e}"}
        for mode in modes:
            flops = 4 * T * args.top_k * args.hidden * args.ffn * (1 if mode == "fwd" else 3)
            row = {"tokens": T, "mode": mode, "gflop": flops / 1e9}
            for name, (f_fwd, f_bwd) in paths.items():
                try:
                    ms = timer(f_fwd if mode == "fwd" else f_bwd, args.warmup, args.iters)
                    row[f"{name}_ms"], row[f"{name}_tflops"] = ms, flops / (ms * 1e-3) / 1e12
                except Exception as e:
                    row[f"{name}_error"] = f"{type(e).__name__}: {e}"
                    log.exception("%s %s T=%d failed", name, mode, T)
            if "fused_ms" in row and "dense_ms" in row:
                row["fused_vs_dense"] = row["dense_ms"] / row["fused_ms"]  # (a)/(c) in TFLOP/s
            if "fused_ms" in row and "loop_ms" in row:
                row["fused_vs_loop"] = row["loop_ms"] / row["fused_ms"]  # (a)/(b): speed-up
            result["rows"].append(row)
            print(_row_md(row), flush=True)
        del paths, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from moe2edge.kernels import triton_moe as tm

    result["tuned_configs"] = tm.tuned_configs()  # the autotuner's picks, by key
    for name, picks in result["tuned_configs"].items():
        for key, cfg in picks.items():
            print(f"tuned {name} {key}: {cfg}")
    return result


_COLS = ("tokens", "mode", "fused ms", "fused TF/s", "loop ms", "loop TF/s", "dense ms", "dense TF/s",
         "(a)/(c)", "(a)/(b)")


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "err"


def _row_md(r: dict) -> str:
    cells = [
        str(r["tokens"]), r["mode"],
        _fmt(r.get("fused_ms"), ".3f"), _fmt(r.get("fused_tflops"), ".1f"),
        _fmt(r.get("loop_ms"), ".3f"), _fmt(r.get("loop_tflops"), ".1f"),
        _fmt(r.get("dense_ms"), ".3f"), _fmt(r.get("dense_tflops"), ".1f"),
        _fmt(r.get("fused_vs_dense"), ".2f"), _fmt(r.get("fused_vs_loop"), ".2f"),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(result: dict) -> str:
    s = result["shape"]
    lines = [
        f"MoE FFN on {result['device']} (torch {result['torch']}, triton {result['triton']}): "
        f"H {s['hidden']}, F {s['ffn']}, E {s['experts']}, top-{s['top_k']}, {s['dtype']}",
        "",
        "| " + " | ".join(_COLS) + " |",
        "|" + "---|" * len(_COLS),
        *(_row_md(r) for r in result["rows"]),
        "",
        "(a) fused Triton, (b) per-expert loop (moe_mlp_ref), (c) dense GEMM pair with the same active "
        "FLOPs. (a)/(c) = TFLOP/s ratio (goal >= 0.70); (a)/(b) = speed-up (goal >= 3).",
        "",
        "numerics (max |fused - ref_fp32| <= 2 max |ref_lowp - ref_fp32| + eps): "
        + ", ".join(
            (f"T={t}: {'ok' if n['ok'] else 'FAIL'} ({n['max_err_fused']:.3g} vs bound {n['bound']:.3g})"
             if "error" not in n else f"T={t}: ERROR {n['error']}")
            for t, n in result["numerics"].items()
        ),
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    print("| " + " | ".join(_COLS) + " |", flush=True)  # rows stream as they finish
    result = run(args)
    print("\n" + markdown(result), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        log.info("wrote %s", args.json)
    return result


if __name__ == "__main__":
    res = main()
    bad = [t for t, n in res["numerics"].items() if not n.get("ok")]
    sys.exit(1 if bad or any(k.endswith("_error") for r in res["rows"] for k in r) else 0)
