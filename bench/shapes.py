"""Per-new-shape cost of engine runtimes, and what sequence-length bucketing does about it.

    .venv/bin/python bench/shapes.py ENGINE... [--buckets 0 8 16 32 64] [--texts 60] [--rounds 1]

For every engine x bucket size, in a fresh process (runtime kernel caches start empty), 1 thread:
``first``: batch-1 calls on held-out real texts of varying length (benchmarks/benchtext-v1), each text
once -- every new length is a new shape; ``seen``: the same texts again (their shapes now prepared);
``fixed``: one 128-token text repeated (the old benchmark input); ``b32``: batches of 32 new texts.
Prints median ms and first/fixed; writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def child(engine: str, bucket: int, n: int, n32: int) -> dict:
    import numpy as np

    from moe2edge.data.benchtext import load_bench_texts
    from moe2edge.data.evaluate import texts_of_n_tokens, time_ms
    from moe2edge.targets.runtime import load_engine

    texts = [r["text"] for r in load_bench_texts()]
    warm, first, batches = texts[:2], texts[2:2 + n], texts[2 + n:2 + n + 32 * n32]
    e = load_engine(engine, threads=1, shape_buckets=bucket)
    for t in warm:
        e.encode([t], batch_size=1)

    def timed(items, bs):
        return float(np.median([time_ms(lambda: e.encode(x, batch_size=bs)) for x in items]))

    from moe2edge.data.evaluate import token_counter

    fixed_text = texts_of_n_tokens(token_counter(e), 128, 1)[0]
    out = {"first": timed([[t] for t in first], 1), "seen": timed([[t] for t in first], 1)}
    out["fixed"] = timed([[fixed_text]] * 22, 1)
    out["b32_first"] = timed([batches[i * 32:(i + 1) * 32] for i in range(n32)], 32)
    toks = sorted(e.count_tokens(first))  # after timing: counting warms nothing the engine uses
    out["tokens_median"] = toks[len(toks) // 2]
    out["distinct_lengths"] = len(set(toks))
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("engines", nargs="*")
    p.add_argument("--buckets", type=int, nargs="+", default=[0, 8, 16, 32, 64])
    p.add_argument("--texts", type=int, default=60)
    p.add_argument("--b32", type=int, default=3, help="batches of 32 new texts")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole grid (interleaved), median")
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "BUCKET"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.texts, a.b32)))
        return 0
    rows: dict = {}
    for _ in range(a.rounds):
        for e in a.engines:
            for b in a.buckets:
                cmd = [sys.executable, __file__, "--child", e, str(b), "--texts", str(a.texts), "--b32", str(a.b32)]
                r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                rows.setdefault(f"{e}|{b}", []).append(r)
    res = {}
    print(f"{'engine':<36} {'bucket':>6} {'first':>7} {'seen':>7} {'fixed':>7} {'first/fixed':>11} {'b32 first':>9}")
    for k, rs in rows.items():
        e, b = k.split("|")
        med = {m: sorted(r[m] for r in rs)[len(rs) // 2] for m in rs[0]}
        res[k] = med
        print(f"{e[-36:]:<36} {b:>6} {med['first']:>7.2f} {med['seen']:>7.2f} {med['fixed']:>7.2f} "
              f"{med['first'] / med['fixed']:>11.2f} {med['b32_first']:>9.1f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"threads": 1, "texts": a.texts, "rounds": a.rounds, "results": res}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
