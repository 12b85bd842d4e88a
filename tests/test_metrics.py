"""Metrics agree with pytrec_eval (trec_eval) to 1e-6, and one example is worked by hand."""

import math
import random

import pytest

from moe2edge.data.metrics import aggregate, evaluate_run, mrr_at_k, ndcg_at_k, per_query, rank, recall_at_k


def test_hand_computed_example():
    # Ranking: d1 (rel 0), d2 (rel 2), d3 (rel 0), d4 (rel 1); judged but not retrieved: d9 (rel 1).
    run = {"q": {"d1": 0.9, "d2": 0.8, "d3": 0.7, "d4": 0.6}}
    qrels = {"q": {"d2": 2, "d4": 1, "d9": 1, "d1": 0}}
    # DCG = 2/log2(3) + 1/log2(5) = 1.26186 + 0.43068 = 1.69254
    # IDCG (rels 2,1,1) = 2/log2(2) + 1/log2(3) + 1/log2(4) = 2 + 0.63093 + 0.5 = 3.13093
    # nDCG@10 = 1.69254 / 3.13093 = 0.540586
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 + 1 / math.log2(3) + 0.5
    assert dcg / idcg == pytest.approx(0.540586, abs=1e-6)
    s = per_query(run, qrels)["q"]
    assert s["ndcg@10"] == pytest.approx(0.540586, abs=1e-6)
    assert s["recall@100"] == pytest.approx(2 / 3)  # d2, d4 of {d2, d4, d9}
    assert s["mrr@10"] == pytest.approx(0.5)  # first relevant at rank 2
    ranked = rank(run["q"])
    assert recall_at_k(ranked, qrels["q"], 1) == 0.0
    assert mrr_at_k(ranked, qrels["q"], 1) == 0.0
    assert ndcg_at_k(ranked, qrels["q"], 2) == pytest.approx((2 / math.log2(3)) / (2 + 1 / math.log2(3)))


def test_ties_broken_like_trec_eval():
    # Equal scores: trec_eval ranks by doc id descending.
    assert rank({"a": 1.0, "c": 1.0, "b": 1.0, "z": 0.5}) == ["c", "b", "a", "z"]


def _random_case(seed: int):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(150)]
    run, qrels = {}, {}
    for q in range(40):
        qid = f"q{q}"
        # coarse scores so that ties occur
        run[qid] = {d: round(rng.random(), 1 if q % 3 == 0 else 6) for d in rng.sample(docs, rng.randint(0, 120))}
        qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 8))}
    qrels["q_no_positive"] = {"d1": 0}
    run["q_no_qrels"] = {"d1": 1.0}
    return run, qrels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_pytrec_eval(seed):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    run, qrels = _random_case(seed)
    ours = per_query(run, qrels)
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    ref = ev.evaluate(run)
    # MRR@10 == trec_eval's recip_rank on the run cut to its top 10 (trec_eval order)
    run10 = {q: {d: run[q][d] for d in rank(r)[:10]} for q, r in run.items()}
    ref_rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run10)
    judged = {q for q, r in qrels.items() if any(v > 0 for v in r.values())}
    assert set(ours) == judged
    for q in ours:
        if q not in ref:  # judged query absent from the run: trec_eval skips it, we score 0
            assert ours[q] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
            continue
        assert ours[q]["ndcg@10"] == pytest.approx(ref[q]["ndcg_cut_10"], abs=1e-6)
        assert ours[q]["recall@100"] == pytest.approx(ref[q]["recall_100"], abs=1e-6)
        assert ours[q]["mrr@10"] == pytest.approx(ref_rr[q]["recip_rank"], abs=1e-6)


def test_queries_without_qrels_reported_and_per_language():
    run = {"a": {"d1": 1.0}, "b": {"d2": 1.0}, "c": {"d1": 1.0}}
    qrels = {"a": {"d1": 1}, "b": {"d1": 1}}
    res = evaluate_run(run, qrels, {"a": "en", "b": "de"})
    assert res["queries_without_qrels"] == ["c"]
    assert res["overall"]["n_queries"] == 2
    assert res["overall"]["ndcg@10"] == pytest.approx(0.5)
    assert res["per_language"]["en"]["ndcg@10"] == 1.0
    assert res["per_language"]["de"]["ndcg@10"] == 0.0


def test_empty_inputs():
    assert aggregate({})["overall"] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0, "n_queries": 0}
    assert per_query({}, {"q": {"d": 1}})["q"]["ndcg@10"] == 0.0
