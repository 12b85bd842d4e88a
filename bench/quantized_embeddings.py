"""Compact embeddings on the frozen benchmark: index size and nDCG@10 for float32 / int8 / binary, +- rescoring.

    .venv/bin/python bench/quantized_embeddings.py \\
        --model /work/shared-runs/minilm-moe/final --name "MoE teacher" \\
        --model runs/students/dense-6L-F224 --name "dense student" [--rescore 40] [--dims 384,128]

Each model encodes the corpus and the queries ONCE (float32, cached under --cache so the table can be
rebuilt without encoding again); every precision is then the same embeddings with the corpus quantised
(``moe2edge.data.quantize``; int8 ranges calibrated on the corpus and reused for the queries) and the
queries quantised alike, exactly what ``moe2edge eval --precision ... --rescore N`` computes; int8 is
scored both ways (raw code dot product as sentence-transformers' usearch search, and dequantised), and
binary is also rescored against int8 codes of the corpus (a binary index in memory, int8 on disk). Smaller
Matryoshka dims come from the same cache (truncate the unit vectors, re-normalise: equal to truncating
the pooled vector, since normalisation is scale-free). Prints a Markdown table; --out writes the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _cache_key(model_path: str, ds) -> str:
    from moe2edge.teacher.checkpoint import checkpoint_hash

    h = hashlib.sha256()
    h.update(checkpoint_hash(model_path).encode())
    h.update(json.dumps((ds.manifest or {}).get("benchmark", {}).get("files"), sort_keys=True).encode())
    h.update(json.dumps(sorted(ds.queries)).encode())
    return h.hexdigest()[:16]


def embeddings(model_path: str, ds, cache: Path, batch_size: int):
    """(doc ids, doc emb, query emb, query ids) in float32, from the cache or by encoding once."""
    from moe2edge.data import evaluate as ev

    qids, _ = ev.check_dataset(ds)
    f = cache / f"{Path(model_path).name}-{_cache_key(model_path, ds)}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=False)
        return list(z["doc_ids"]), z["d"], z["q"], list(z["qids"])
    from moe2edge.compile.cmd_eval import load_model

    model, _ = load_model(model_path)
    doc_ids, d, q, t = ev.encode_dataset(model, ds, qids, batch_size=batch_size)
    logging.info("%s: encoded in %.0f s", model_path, t["encode_docs"] + t["encode_queries"])
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(f, doc_ids=np.array(doc_ids), d=d, q=q, qids=np.array(qids))
    return doc_ids, d, q, qids


def _truncate(x: np.ndarray, dim: int) -> np.ndarray:
    x = x[:, :dim]
    return (x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="checkpoint folder; repeat")
    p.add_argument("--name", action="append", default=None, help="display name per --model")
    p.add_argument("--data", default=str(ROOT / "benchmarks" / "debian-bookworm-v1"))
    p.add_argument("--rescore", type=int, default=40,
                   help="candidates reranked with the float query (default 40 = ST's top_k 10 x rescore_multiplier 4)")
    p.add_argument("--dims", default=None, help="Matryoshka dims to add, comma-separated (default: full only)")
    p.add_argument("--cache", default=str(ROOT / "runs" / "quant-cache"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    from moe2edge.data import evaluate as ev
    from moe2edge.data.readers import load_beir

    ds = load_beir(args.data)
    names = (args.name or []) + [Path(m).name for m in args.model[len(args.name or []):]]
    results = []
    for path, name in zip(args.model, names):
        doc_ids, d, q, qids = embeddings(path, ds, Path(args.cache), args.batch_size)
        dims = [d.shape[1]] + [int(x) for x in (args.dims or "").split(",") if x and int(x) != d.shape[1]]
        for dim in dims:
            emb = (doc_ids, _truncate(d, dim), _truncate(q, dim), qids)
            base = ev.evaluate_quantized({"model": {"name": name, "kind": "dense"}, "warnings": []}, ds, emb,
                                         precision="float32")
            base["model"]["name"] = name
            rows = [base]
            for prec, scoring in (("int8", "codes"), ("int8", "dequantized"), ("ubinary", None)):
                for n in (0, args.rescore):
                    rows.append(ev.evaluate_quantized(base, ds, emb, precision=prec, rescore=n,
                                                      int8_scoring=scoring or "dequantized"))
            for n in dict.fromkeys((args.rescore, 100)):  # binary in memory, int8 codes on disk for the rerank
                rows.append(ev.evaluate_quantized(base, ds, emb, precision="ubinary", rescore=n, rescore_with="int8"))
            ref = base["metrics"]
            for r in rows:
                m = r["metrics"]
                results.append({"model": name, "dim": dim, "precision": r["index"]["precision"],
                                "int8_scoring": r["index"].get("int8_scoring"),
                                "rescore_with": r["index"].get("rescore_with"),
                                "rescore_bytes": r["index"].get("rescore_bytes"),
                                "rescore": r["index"]["rescore"], "bytes_per_doc": r["index"]["bytes_per_doc"],
                                "index_bytes": r["index"]["bytes"], "n_docs": r["index"]["n_docs"],
                                "ndcg@10_en": m["per_language"]["en"]["ndcg@10"],
                                "ndcg@10_all": m["overall"]["ndcg@10"],
                                "retention_en": m["per_language"]["en"]["ndcg@10"] / ref["per_language"]["en"]["ndcg@10"],
                                "retention_all": m["overall"]["ndcg@10"] / ref["overall"]["ndcg@10"],
                                "recall@100_all": m["overall"]["recall@100"]})
    print(markdown(results))
    if args.out:
        from moe2edge._io import write_json

        write_json(args.out, {"data": args.data, "rescore": args.rescore, "results": results})
    return 0


def markdown(rows) -> str:
    n = f"{rows[0]['n_docs']:,}" if rows else "?"
    out = [f"| model | dim | precision | rescore | bytes/doc | index ({n} docs) | nDCG@10 en (retention) | "
           "nDCG@10 all (retention) | R@100 all |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        prec = r["precision"] + {"codes": " (codes, ST)", "dequantized": " (dequantised)"}.get(r.get("int8_scoring"), "")
        rs = (f"{r['rescore']} (int8 on disk: {r['rescore_bytes'] / 1024:.0f} KiB)" if r.get("rescore_with")
              else r["rescore"] or "–")
        out.append(f"| {r['model']} | {r['dim']} | {prec} | {rs} | {r['bytes_per_doc']} | "
                   f"{r['index_bytes'] / 1024:.0f} KiB | {r['ndcg@10_en']:.4f} ({100 * r['retention_en']:.1f}%) | "
                   f"{r['ndcg@10_all']:.4f} ({100 * r['retention_all']:.1f}%) | {r['recall@100_all']:.4f} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
