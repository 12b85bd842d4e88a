"""Build the frozen latency text set ``benchmarks/benchtext-v1`` (``data/benchtext.py``).

    .venv/bin/python bench/build_benchtext.py [--lists DIR] [--out DIR] [--per-language N]

A script, not a library call: it needs the imported e5 tokenizer (``teacher/e5_import``), which the
``data`` layer must not import.
"""

from __future__ import annotations

import argparse
import json

from moe2edge.data.benchtext import DEFAULT_DIR, PER_LANGUAGE, build_bench_texts, write_bench_texts
from moe2edge.teacher.e5_import import e5_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="build the frozen latency text set (benchmarks/benchtext-v1)")
    p.add_argument("--lists", default=".cache/moe2edge/debian-bookworm/lists")
    p.add_argument("--out", default=str(DEFAULT_DIR))
    p.add_argument("--per-language", type=int, default=PER_LANGUAGE)
    a = p.parse_args(argv)
    rows, report = build_bench_texts(a.lists, e5_checkpoint() / "tokenizer.json", per_language=a.per_language)
    write_bench_texts(a.out, rows, report)
    print(json.dumps({k: report[k] for k in ("texts", "per_language", "tokens")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
