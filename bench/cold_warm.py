"""Cold vs warm latency of one model on held-out real text (issue 13): the static student's number depends
on its per-word tokenizer cache, so both are reported.

    .venv/bin/python bench/cold_warm.py student runs/students/e5-static --out runs/cold_warm-static.json

A fresh process (``moe2edge bench``'s measuring child, 1 thread) loads the model; COLD = every
``benchmarks/benchtext-v1`` text (all 14 languages, 110-225 tokens, varying length), each once, nothing seen
before except 2 warm-up texts never timed; WARM = the same texts again, in the same order, in the same process
(the tokenizer cache now holds their words, the runtime has seen their shapes). Batch 1, then batch 32 on
disjoint texts. KIND is what ``moe2edge.targets.bench`` serves: student | engine | pytorch | builtin.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _p(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"p50_ms": round(statistics.median(s), 4), "p95_ms": round(s[min(len(s) - 1, int(0.95 * len(s)))], 4),
            "n": len(s)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("student", "engine", "pytorch", "builtin"))
    p.add_argument("path")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--b32-calls", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    from moe2edge.data.benchtext import load_bench_texts
    from moe2edge.targets.bench import _Worker

    rows = load_bench_texts()
    texts = [r["text"] for r in rows]
    warmup, n32 = texts[:2], 32 * a.b32_calls
    b32 = texts[2:2 + n32]
    b1 = texts[2 + n32:]
    w = _Worker(a.kind, a.path, a.threads)
    try:
        for t in warmup:
            w.ask(op="encode", texts=[t], batch=1)
        res = {}
        for phase in ("cold", "warm"):
            res[phase] = {
                "batch=1": _p([w.ask(op="encode", texts=[t], batch=1)["ms"] for t in b1]),
                "batch=32": _p([w.ask(op="encode", texts=b32[i:i + 32], batch=32)["ms"] for i in range(0, n32, 32)]),
            }
        fixed = w.ask(op="fixed", threads=[a.threads], repeats={"1": 20, "32": 5}, seq_len=128, batch_sizes=[1, 32])
        info = w.ask(op="info", texts=b1)
    finally:
        w.close()
    out = {"model": a.path, "kind": a.kind, "threads": a.threads, "load_s": w.ready["load_s"],
           "texts": {"source": "benchmarks/benchtext-v1", "languages": len({r["language"] for r in rows}),
                     "batch1": len(b1), "batch32": n32, "tokens_batch1": info.get("tokens")},
           **res, "fixed_128": fixed.get(f"threads={a.threads}"), "peak_rss_mb": info.get("peak_rss_mb"),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}}
    print(json.dumps(out, indent=1))
    if a.out:
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
