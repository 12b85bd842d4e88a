"""Retrieval metrics (nDCG@k, Recall@k, MRR@k) that agree with trec_eval / pytrec_eval.

Conventions follow trec_eval (and so pytrec_eval, BEIR and MTEB):

* a run is ``{qid: {docid: score}}``; documents are ranked by score descending, ties broken by
  doc id *descending* (trec_eval sorts ``(sim, docno)`` in decreasing order);
* relevance > 0 is relevant; nDCG uses linear gain ``rel / log2(rank + 1)`` and the ideal DCG of
  all judged documents (retrieved or not);
* queries without qrels (or only non-positive ones) are not evaluated; they are reported;
* MRR@k = 1 / rank of the first relevant document within the top k, else 0 (trec_eval's
  ``recip_rank`` on the run cut to k).
"""

from __future__ import annotations

import math
from collections import defaultdict

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def rank(run_q: dict[str, float]) -> list[str]:
    """Doc ids in trec_eval order: score descending, then doc id descending."""
    return [d for d, _ in sorted(run_q.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def ndcg_at_k(ranked: list[str], rels: dict[str, int], k: int) -> float:
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if rels.get(d, 0) > 0)
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: list[str], rels: dict[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at_k(ranked: list[str], rels: dict[str, int], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


_FUNCS = {"ndcg": ndcg_at_k, "recall": recall_at_k, "mrr": mrr_at_k}


def per_query(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]],
              metrics=METRICS) -> dict[str, dict[str, float]]:
    """``{qid: {metric: value}}`` for every query with at least one relevant judgement.

    A judged query missing from the run (nothing retrieved) scores 0 on every metric.
    """
    out = {}
    for qid, rels in qrels.items():
        if not any(r > 0 for r in rels.values()):
            continue
        ranked = rank(run.get(qid, {}))
        out[qid] = {}
        for m in metrics:
            name, k = m.split("@")
            out[qid][m] = _FUNCS[name](ranked, rels, int(k))
    return out


def aggregate(scores: dict[str, dict[str, float]], languages: dict[str, str] | None = None,
              metrics=METRICS) -> dict:
    """Mean per metric overall and per language: ``{"overall": {...}, "per_language": {lang: {...}}}``."""
    def mean(qids):
        row = {m: (sum(scores[q][m] for q in qids) / len(qids) if qids else 0.0) for m in metrics}
        row["n_queries"] = len(qids)
        return row

    by_lang = defaultdict(list)
    for q in scores:
        by_lang[(languages or {}).get(q) or "all"].append(q)
    return {"overall": mean(list(scores)), "per_language": {lang: mean(q) for lang, q in sorted(by_lang.items())}}


def evaluate_run(run, qrels, languages=None, metrics=METRICS) -> dict:
    """Aggregate metrics plus bookkeeping about queries that could not be evaluated."""
    scores = per_query(run, qrels, metrics)
    result = aggregate(scores, languages, metrics)
    result["queries_without_qrels"] = sorted(set(run) - set(scores))
    return result
