"""`moe2edge report`: Markdown + self-contained HTML (embedded PNG) from `moe2edge eval` results."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="render eval results as Markdown + HTML with a quality-vs-latency plot",
        description="Merge one or more `moe2edge eval --out` JSON files (teacher, students and baselines "
        "on the same rows) into OUT/report.md, OUT/report.html (self-contained, plot embedded) and "
        "OUT/quality_vs_latency.png.",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS.json", help="eval result files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--title", default="moe2edge evaluation")
    p.set_defaults(func=run)


def run(args) -> int:
    from moe2edge._io import output_folder
    from moe2edge.data.report import load_results, render_report

    output_folder(args.out, inputs=args.results)  # writable, before reading or rendering anything
    runs = load_results(args.results)
    files = render_report(runs, args.out, title=args.title)
    print(f"report for {len(runs)} model(s): " + ", ".join(str(p) for p in files.values()))
    return 0
