"""`moe2edge bench`: latency p50/p95, throughput, peak memory and size of engine folders (+ PyTorch baseline)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark engine folders (and a PyTorch checkpoint as baseline): latency, throughput, memory, size",
        description=(
            "Measure each engine folder (from `moe2edge compile`) and optionally a PyTorch checkpoint folder, "
            "each in its own subprocess: p50/p95 ms per encode call at batch 1 and 32 with 128-token real-word "
            "texts, at 1 and 2 threads, throughput at batch 32, peak RSS, model size and the parity recorded at "
            "compile time. Writes JSON (--out) and prints a table. Time on an otherwise idle machine; one "
            "thread is the stable number on shared boxes."
        ),
    )
    p.add_argument("engines", nargs="*", help="engine folders")
    p.add_argument("--model", default=None, help="PyTorch checkpoint folder to measure as the baseline")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    p.add_argument("--repeats", type=int, nargs=2, default=[20, 5], metavar=("B1", "B32"),
                   help="timed calls at batch 1 and at batch 32 (default 20 5)")
    p.add_argument("--out", default=None, help="JSON output path")
    p.set_defaults(func=run)


def run(args) -> int:
    from moe2edge._io import write_json
    from moe2edge.targets.bench import bench, table

    if not args.engines and not args.model:
        raise ValueError("nothing to measure: give engine folders and/or --model CHECKPOINT")
    report = bench(args.engines, pytorch=args.model, threads=tuple(args.threads),
                   repeats={1: args.repeats[0], 32: args.repeats[1]})
    print(table(report))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0
