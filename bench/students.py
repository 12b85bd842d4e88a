"""Students vs their teacher: quality retention, agreement, CPU latency, parameters, size.

    # the table (full frozen benchmark, 1-thread latency): teacher first, then student folders
    .venv/bin/python bench/students.py table --teacher runs/exp-cpu-default/final \
        --student runs/students/pruned --student runs/students/dense --student runs/students/static \
        --out runs/students/table.json

    # ablation of the build choices BEFORE any fine-tune (expert score, merge, gate mass; dense init)
    .venv/bin/python bench/students.py ablate --teacher runs/exp-cpu-default/final --out runs/students/ablate.json

``ablate`` uses a quick split (the English queries, and a corpus of their relevant documents plus
as many random others) so each variant costs seconds; its numbers compare variants with each other,
not with the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "debian-bookworm-v1"
log = logging.getLogger("bench.students")


def _size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def _params(model) -> dict:
    from moe2edge.student.dense import active_non_embedding_parameters

    inner = getattr(model, "model", None)
    if inner is None:  # static
        return {"total": int(model.table.size), "active_non_embedding": 0}
    return {"total": int(sum(p.numel() for p in inner.parameters())),
            "active_non_embedding": active_non_embedding_parameters(inner)}


def latency(model, repeats: int) -> dict:
    from moe2edge.data.evaluate import measure_latency

    lat = measure_latency(model, threads=[1], repeats={1: repeats, 32: max(3, repeats // 4)})["threads=1"]
    return {"b1_ms": lat["batch=1"]["p50_ms"], "b32_ms": lat["batch=32"]["p50_ms"]}


def cmd_table(args) -> int:
    from moe2edge.data import evaluate as ev
    from moe2edge.data.readers import load_beir
    from moe2edge.student import load_student

    torch.set_num_threads(1)
    ds = load_beir(args.data)
    cache = Path(args.cache) if args.cache else None

    def evaluate(path):
        """(result, doc emb, query emb, latency) of one folder; cached per folder + checkpoint identity."""
        key = None
        if cache is not None:
            ident = (Path(path) / "model.safetensors").stat().st_mtime_ns
            key = cache / f"{Path(path).resolve().as_posix().replace('/', '_')}-{ident}"
            if key.with_suffix(".npz").exists():
                z = np.load(key.with_suffix(".npz"))
                meta = json.loads(key.with_suffix(".json").read_text())
                return meta["res"], z["d"], z["q"], meta["latency"], meta["params"]
        model = load_student(path)
        res, emb = ev.evaluate_dense(model, ds, return_embeddings=True)
        lat = None if args.no_latency else latency(model, args.repeats)
        params = _params(model)
        if key is not None:
            cache.mkdir(parents=True, exist_ok=True)
            np.savez(key.with_suffix(".npz"), d=emb[1], q=emb[2])
            key.with_suffix(".json").write_text(json.dumps({"res": res, "latency": lat, "params": params}))
        return res, emb[1], emb[2], lat, params

    rows = []
    t_res, t_d, t_q, _, _ = evaluate(args.teacher)
    for name, path in [("teacher", args.teacher)] + [(Path(p).name, p) for p in args.student]:
        t0 = time.perf_counter()
        res, d, q, lat, params = evaluate(path)
        agree = ev.agreement_from_embeddings(q, d, t_q, t_d)
        per = {k: v["ndcg@10"] for k, v in res["metrics"]["per_language"].items()}
        row = {"name": name, "path": str(path), "ndcg@10": res["metrics"]["overall"]["ndcg@10"],
               "ndcg@10_en": per.get("en"), "per_language": per, "agreement": agree, **params,
               "size_bytes": _size_bytes(path), "encode_s": res["timings_s"]}
        if lat:
            row["latency"] = lat
        rows.append(row)
        log.info("%s done in %.0f s", name, time.perf_counter() - t0)
    base = rows[0]
    for r in rows:
        r["ratio"] = r["ndcg@10"] / base["ndcg@10"]
        r["ratio_en"] = r["ndcg@10_en"] / base["ndcg@10_en"] if base["ndcg@10_en"] else None
        r["params_ratio"] = r["active_non_embedding"] / max(base["active_non_embedding"], 1)
        if "latency" in r:
            r["speedup_b1"] = base["latency"]["b1_ms"] / r["latency"]["b1_ms"]
            r["speedup_b32"] = base["latency"]["b32_ms"] / r["latency"]["b32_ms"]
    print(markdown(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


def markdown(rows) -> str:
    head = ("| model | nDCG@10 all | ratio | nDCG@10 en | ratio en | top-10 overlap | Spearman | cos | b1 ms | "
            "b32 ms | speedup b1/b32 | active non-emb params | size MB |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        a, lat = r["agreement"], r.get("latency", {})
        cos = f"{a['cosine_mean']:.3f}" if a.get("cosine_mean") is not None else "-"
        out.append(
            f"| {r['name']} | {r['ndcg@10']:.4f} | {r['ratio']:.3f} | {r['ndcg@10_en']:.4f} | {r['ratio_en']:.3f} | "
            f"{a['topk_overlap']:.3f} | {a['spearman_mean']:.3f} | {cos} | "
            f"{lat.get('b1_ms', float('nan')):.2f} | {lat.get('b32_ms', float('nan')):.1f} | "
            f"{r.get('speedup_b1', float('nan')):.0f}x / {r.get('speedup_b32', float('nan')):.0f}x | "
            f"{r['active_non_embedding'] / 1e6:.2f}M ({r['params_ratio']:.2f}) | {r['size_bytes'] / 1e6:.1f} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ ablation


def quick_split(ds, n_queries: int = 300, n_extra: int = 300, seed: int = 0):
    """The first ``n_queries`` English queries; corpus = their relevant docs + ``n_extra`` random others."""
    qids = [q for q in ds.queries if ds.languages.get(q) == "en" and q in ds.qrels][:n_queries]
    rel = {d for q in qids for d in ds.qrels[q]}
    others = sorted(set(ds.corpus) - rel)
    keep = rel | set(random.Random(seed).sample(others, min(n_extra, len(others))))
    ds.queries = {q: ds.queries[q] for q in qids}
    ds.qrels = {q: ds.qrels[q] for q in qids}
    ds.corpus = {d: v for d, v in ds.corpus.items() if d in keep}
    return ds


def cmd_ablate(args) -> int:
    from moe2edge.compile.recipes import load_training_pairs
    from moe2edge.data import evaluate as ev
    from moe2edge.data.readers import load_beir
    from moe2edge.student import calibrate, densify, prune_experts
    from moe2edge.student.recipe import calibration_texts
    from moe2edge.teacher import load_embedder
    from moe2edge.teacher.embedder import Embedder

    torch.set_num_threads(1)
    ds = quick_split(load_beir(args.data), args.queries, args.extra_docs)
    teacher = load_embedder(args.teacher)
    pairs = load_training_pairs({"pairs": args.pairs, "languages": ["en"], "max_pairs": 8000, "seed": 1})
    calib = calibrate(teacher.model, teacher.tokenizer, calibration_texts(teacher, pairs, 512), max_tokens=16384)
    summary = calib.summary()
    t_res, (_, t_d, t_q, _) = ev.evaluate_dense(teacher, ds, return_embeddings=True)
    base = t_res["metrics"]["overall"]["ndcg@10"]
    rows = [{"variant": "teacher", "ndcg@10": base, "ratio": 1.0}]
    print(f"teacher nDCG@10 {base:.4f}; gate mass per layer "
          + ", ".join(f"{k}: {v.get('gate_mass')}" for k, v in summary["layers"].items() if "gate_mass" in v))
    variants = []
    E = teacher.model.config.num_experts
    # shapes within 1/3 of the MiniLM-MoE teacher's 14.2M active non-embedding parameters
    for layers, width in (([0, 2, 4], 768), ([1, 3, 5], 768), ([0, 3, 5], 768), ([0, 1, 3, 5], 512),
                          ([0, 2, 3, 5], 512), ([0, 1, 2, 3, 4, 5], 256), ([0, 1, 2, 3, 4, 5], 224)):
        for refit in (False, True):
            variants.append((f"dense layers={layers} F={width} init=merge rescale=True refit={refit}", "dense",
                             dict(init="merge", rescale=True, layers=layers, intermediate_size=width, refit=refit)))
    for k in args.experts:
        for score in ("router", "output_norm"):
            for merge in (False, True):
                variants.append((f"pruned {k}/{E} top-1 score={score} merge={merge} gate=rescale", "pruned",
                                 dict(num_experts=k, top_k=1, score=score, merge=merge, rescale=True)))
        for gate in ("keep", "normalize"):
            variants.append((f"pruned {k}/{E} top-1 score=router merge=True gate={gate}", "pruned",
                             dict(num_experts=k, top_k=1, score="router", merge=True,
                                  normalize=gate == "normalize", rescale=False)))
    for init in ("merge", "top"):
        for rescale in (False, True):
            variants.append((f"dense all layers init={init} rescale={rescale}", "dense",
                             dict(init=init, rescale=rescale)))
    if args.static:
        rows += ablate_static(teacher, pairs, ds, base, t_q, t_d)
        variants = []
    for name, kind, opts in variants:
        if args.only and not any(s in name for s in args.only):
            continue
        m = prune_experts(teacher.model, calib, **opts) if kind == "pruned" else densify(teacher.model, calib, **opts)
        emb = Embedder(m, teacher.tokenizer)
        res, e = ev.evaluate_dense(emb, ds, return_embeddings=True)
        agree = ev.agreement_from_embeddings(e[2], e[1], t_q, t_d)
        nd = res["metrics"]["overall"]["ndcg@10"]
        rows.append({"variant": name, "ndcg@10": nd, "ratio": nd / base, "cosine": agree["cosine_mean"],
                     "topk_overlap": agree["topk_overlap"],
                     "output_scale": getattr(m, "pruning", getattr(m, "densify", {}))})
        print(f"{name:<70} nDCG@10 {nd:.4f} ratio {nd / base:.3f} cos {agree['cosine_mean']:.3f} "
              f"top10 {agree['topk_overlap']:.3f}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"calibration": summary, "rows": rows}, indent=2, default=str) + "\n")
    return 0


def ablate_static(teacher, pairs, ds, base, t_q, t_d) -> list[dict]:
    """Static variants from ONE pass of the vocabulary through the teacher: PCA dim x weighting."""
    from moe2edge.data import evaluate as ev
    from moe2edge.student import static as S

    tok_file = Path(teacher.tokenizer.dir) / "tokenizer.json"
    raw = S.token_embeddings(teacher)  # (V, D)
    corpus = [t for p in pairs for t in (p.query, p.positive)]
    counts = S.token_frequencies(tok_file, corpus, raw.shape[0])
    rows = []
    for dim in (None, 256, 128):
        table0 = raw if dim is None else S.pca(raw, dim)
        for weighting in ("none", "zipf", "sif"):
            for a in ((1e-3, 1e-4) if weighting != "none" else (0,)):
                if weighting == "zipf":
                    p = 1.0 / np.arange(1, len(raw) + 1)
                    p = p / p.sum()
                else:
                    p = (counts + 1.0) / (counts.sum() + len(raw))
                w = np.ones(len(raw)) if weighting == "none" else a / (a + p)
                cfg = S.StaticConfig(vocab_size=len(raw), hidden_size=table0.shape[1],
                                     max_seq_length=teacher.model.config.max_seq_length,
                                     prompts=dict(teacher.model.config.prompts))
                st = S.StaticEmbedder(table0 * w[:, None].astype(np.float32), tok_file, cfg)
                res, e = ev.evaluate_dense(st, ds, return_embeddings=True)
                agree = ev.agreement_from_embeddings(e[2], e[1], t_q, t_d)
                nd = res["metrics"]["overall"]["ndcg@10"]
                name = f"static dim={dim or raw.shape[1]} weighting={weighting} a={a}"
                rows.append({"variant": name, "ndcg@10": nd, "ratio": nd / base, "topk_overlap": agree["topk_overlap"]})
                print(f"{name:<70} nDCG@10 {nd:.4f} ratio {nd / base:.3f} top10 {agree['topk_overlap']:.3f}", flush=True)
    return rows


def cmd_latency(args) -> int:
    """Interleaved rounds over all models (fair on a noisy shared box): median ms of b1 and b32 x 128 tokens."""
    from moe2edge.data.evaluate import texts_of_n_tokens, time_ms, token_counter
    from moe2edge.student import load_student

    torch.set_num_threads(1)
    paths = [args.teacher, *args.student]
    models = [load_student(p) for p in paths]
    texts = [texts_of_n_tokens(token_counter(m), 128, 32) for m in models]
    ms = {p: {"b1": [], "b32": []} for p in paths}
    for m, t in zip(models, texts):  # warm-up
        m.encode(t[:1], batch_size=1)
        m.encode(t, batch_size=32)
    for _ in range(args.rounds):
        for p, m, t in zip(paths, models, texts):
            ms[p]["b1"] += [time_ms(lambda: m.encode(t[:1], batch_size=1)) for _ in range(5)]
            ms[p]["b32"].append(time_ms(lambda: m.encode(t, batch_size=32)))
    out = {p: {k: float(np.median(v)) for k, v in d.items()} for p, d in ms.items()}
    base = out[args.teacher]
    for p, d in out.items():
        print(f"{p:<50} b1 {d['b1']:9.3f} ms ({base['b1'] / d['b1']:7.0f}x)   b32 {d['b32']:9.2f} ms "
              f"({base['b32'] / d['b32']:7.0f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": 1, "seq_len": 128, "rounds": args.rounds, "median_ms": out},
                                             indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="teacher vs students on the full frozen benchmark")
    t.add_argument("--teacher", required=True)
    t.add_argument("--student", action="append", default=[])
    t.add_argument("--data", default=str(BENCH))
    t.add_argument("--repeats", type=int, default=20, help="timed calls at batch 1 (batch 32: a quarter)")
    t.add_argument("--no-latency", action="store_true")
    t.add_argument("--out", default=None)
    t.add_argument("--cache", default=None, help="folder caching each model's embeddings, metrics and latency")
    t.set_defaults(func=cmd_table)
    la = sub.add_parser("latency", help="interleaved 1-thread latency of teacher and students (median)")
    la.add_argument("--teacher", required=True)
    la.add_argument("--student", action="append", default=[])
    la.add_argument("--rounds", type=int, default=7)
    la.add_argument("--out", default=None)
    la.set_defaults(func=cmd_latency)
    a = sub.add_parser("ablate", help="build variants without fine-tuning on a quick English split")
    a.add_argument("--teacher", required=True)
    a.add_argument("--pairs", default=str(ROOT / ".cache/moe2edge/debian-bookworm/train/pairs.jsonl"))
    a.add_argument("--data", default=str(BENCH))
    a.add_argument("--experts", type=int, nargs="+", default=[4])
    a.add_argument("--queries", type=int, default=300, help="English queries in the quick split")
    a.add_argument("--extra-docs", type=int, default=300, help="random non-relevant docs added to the quick corpus")
    a.add_argument("--static", action="store_true", help="ablate the static student (dim x weighting) instead")
    a.add_argument("--only", nargs="*", default=None, help="run only variants whose name contains one of these")
    a.add_argument("--out", default=None)
    a.set_defaults(func=cmd_ablate)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
