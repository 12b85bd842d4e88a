"""Baselines on the frozen Debian benchmark: BM25, all-MiniLM-L6-v2, multilingual-e5-small.

    .venv/bin/python bench/baselines.py [--data benchmarks/debian-bookworm-v1] [--out .cache/baselines]

Prints Markdown tables of nDCG@10 / Recall@100 (English queries and cross-lingual queries per
language, all against the English corpus). These are the bars every teacher and student is
measured against (docs/benchmarks.md). Quality only: latency comes from `moe2edge eval`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "benchmarks" / "debian-bookworm-v1"))
    p.add_argument("--models", default="bm25,minilm,e5-small", help="comma-separated built-in models")
    p.add_argument("--out", default=None, help="also write each model's eval JSON to this folder")
    p.add_argument("--threads", type=int, default=1,
                   help="encoding threads (default 1: PyTorch's OpenMP spin-wait collapses on a busy 2-core box)")
    p.add_argument("--results", nargs="*", default=None,
                   help="tabulate existing `moe2edge eval --out` files instead of evaluating again")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from moe2edge.compile.cmd_eval import load_model
    from moe2edge.data import evaluate as ev
    from moe2edge.data.readers import load_beir

    ds = load_beir(args.data)
    if args.results:
        from moe2edge.data.report import load_results

        print(markdown(load_results(args.results), ds))
        return
    runs = []
    for spec in args.models.split(","):
        t = time.perf_counter()
        model, kind = load_model(spec)
        if kind == "dense":
            ev.set_threads(model, args.threads)
        res = ev.evaluate_bm25(ds, model) if kind == "sparse" else ev.evaluate_dense(model, ds)
        res["wall_s"] = time.perf_counter() - t
        runs.append(res)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"{spec}.json").write_text(json.dumps({"schema": ev.SCHEMA, "runs": [res]}, indent=1))
    print(markdown(runs, ds))


def markdown(runs: list[dict], ds) -> str:
    langs = sorted({k for r in runs for k in r["metrics"]["per_language"]}, key=lambda k: (k != "en", k))
    xl = [k for k in langs if k != "en"]

    def m(r, lang, key):
        return r["metrics"]["per_language"].get(lang, {}).get(key)

    def mean(r, key):
        vals = [m(r, k, key) for k in xl if m(r, k, key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    n = {k: max(m(r, k, "n_queries") or 0 for r in runs) for k in langs}
    out = [f"Benchmark `{ds.name}`: {len(ds.corpus)} English documents, {len(ds.queries)} queries "
           f"({n.get('en', 0)} English, {sum(n[k] for k in xl)} cross-lingual in {len(xl)} languages).", "",
           "| model | nDCG@10 en | R@100 en | nDCG@10 x-ling (mean) | R@100 x-ling (mean) | nDCG@10 all |",
           "|---|---|---|---|---|---|"]
    for r in runs:
        out.append(f"| {r['model']['name']} | {m(r, 'en', 'ndcg@10'):.3f} | {m(r, 'en', 'recall@100'):.3f} | "
                   f"{mean(r, 'ndcg@10'):.3f} | {mean(r, 'recall@100'):.3f} | {r['metrics']['overall']['ndcg@10']:.3f} |")
    out += ["", "nDCG@10 / R@100 per query language (n = queries):", "",
            "| model | " + " | ".join(f"{k} (n={n[k]})" for k in langs) + " |",
            "|---|" + "---|" * len(langs)]
    for r in runs:
        out.append(f"| {r['model']['name']} | " + " | ".join(
            f"{m(r, k, 'ndcg@10'):.3f} / {m(r, k, 'recall@100'):.3f}" for k in langs) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
