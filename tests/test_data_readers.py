"""Readers: BEIR folders and JSONL pairs/triplets; malformed lines give file:line errors or counted skips."""

import gzip
import json
import logging

import pytest

from moe2edge.data.readers import MalformedInputError, load_beir, read_pairs, read_qrels


def _beir(tmp_path, corpus_lines, query_lines, qrels_text, gz=False):
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    ext = ".jsonl.gz" if gz else ".jsonl"
    for name, lines in (("corpus", corpus_lines), ("queries", query_lines)):
        data = "".join(line + "\n" for line in lines).encode()
        (d / f"{name}{ext}").write_bytes(gzip.compress(data) if gz else data)
    (d / "qrels" / "test.tsv").write_text(qrels_text)
    return d


GOOD_CORPUS = ['{"_id": "d1", "title": "T", "text": "alpha beta"}', '{"_id": 2, "text": "gamma"}']
GOOD_QUERIES = ['{"_id": "q1", "text": "alpha", "language": "en"}', '{"_id": "q2", "text": "gamma"}']
GOOD_QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\t2\t1\n"


@pytest.mark.parametrize("gz", [False, True])
def test_load_beir(tmp_path, gz):
    ds = load_beir(_beir(tmp_path, GOOD_CORPUS, GOOD_QUERIES, GOOD_QRELS, gz=gz))
    assert ds.corpus == {"d1": {"title": "T", "text": "alpha beta"}, "2": {"title": "", "text": "gamma"}}
    assert ds.queries == {"q1": "alpha", "q2": "gamma"}
    assert ds.languages == {"q1": "en", "q2": ""}
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"2": 1}}
    assert ds.doc_texts() == ["T alpha beta", "gamma"]


def test_malformed_json_line_number(tmp_path):
    corpus = GOOD_CORPUS + ['{"_id": "d3", "text": "x"', '{"_id": "d4", "text": "y"}']
    d = _beir(tmp_path, corpus, GOOD_QUERIES, GOOD_QRELS)
    with pytest.raises(MalformedInputError) as e:
        load_beir(d)
    assert e.value.line == 3 and e.value.path.endswith("corpus.jsonl")
    assert "corpus.jsonl:3: invalid JSON" in str(e.value)


@pytest.mark.parametrize("line, reason", [
    ('{"text": "no id"}', "missing field '_id'"),
    ('{"_id": "q9", "text": 5}', "field 'text' must be a string"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"_id": "q1", "text": "dup"}', "duplicate query id"),
])
def test_malformed_query_lines(tmp_path, line, reason):
    d = _beir(tmp_path, GOOD_CORPUS, GOOD_QUERIES + [line], GOOD_QRELS)
    with pytest.raises(MalformedInputError, match=rf"queries.jsonl:3: .*{reason}"):
        load_beir(d)


def test_lenient_skips_are_counted_not_silent(tmp_path, caplog):
    d = _beir(tmp_path, GOOD_CORPUS + ["{broken", '{"_id": "d5"}'], GOOD_QUERIES, GOOD_QRELS + "q1\td1\n")
    with caplog.at_level(logging.WARNING):
        ds = load_beir(d, strict=False)
    assert len(ds.corpus) == 2
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 2 malformed line(s) of 4" in msgs and "line 3: invalid JSON" in msgs
    assert "test.tsv: skipped 1 malformed line(s)" in msgs


def test_qrels_errors(tmp_path):
    p = tmp_path / "q.tsv"
    p.write_text("query-id\tcorpus-id\tscore\nq1\td1\tmany\n")
    with pytest.raises(MalformedInputError, match=r"q.tsv:2: score 'many' is not a number"):
        read_qrels(p)
    p.write_text("q1 0 d1 2\n")  # TREC 4-column format
    assert read_qrels(p) == {"q1": {"d1": 2}}


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        load_beir(tmp_path / "nope")
    (tmp_path / "x" / "qrels").mkdir(parents=True)
    (tmp_path / "x" / "qrels" / "test.tsv").write_text("")
    with pytest.raises(FileNotFoundError, match="no corpus.jsonl or corpus.jsonl.gz"):
        load_beir(tmp_path / "x")


def test_pairs_and_triplets_with_aliases(tmp_path):
    p = tmp_path / "pairs.jsonl"
    rows = [{"query": "q", "positive": "p"},
            {"anchor": "a", "document": "d", "negatives": ["n1", "n2"]},
            {"query": "q", "positive": "p", "negative": "n", "language": "de"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = read_pairs(p)
    assert [(x.query, x.positive, x.negatives) for x in pairs] == [("q", "p", ()), ("a", "d", ("n1", "n2")),
                                                                   ("q", "p", ("n",))]
    assert pairs[2].language == "de"


def test_pairs_errors(tmp_path):
    p = tmp_path / "pairs.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"query": "q", "positive": "p"}\n{"query": "q"}\n'))
    with pytest.raises(MalformedInputError, match=r"pairs.jsonl.gz:2: missing field positive \(or document\)"):
        read_pairs(p)
    p.write_bytes(gzip.compress(b'{"query": "q", "positive": "p", "negatives": [1]}\n'))
    with pytest.raises(MalformedInputError, match=r":1: field 'negatives' must be a string or a list"):
        read_pairs(p)
    p.write_bytes(gzip.compress(b'{"query": "", "positive": "p"}\n{"query": "q", "positive": "p"}\n'))
    assert len(read_pairs(p, strict=False)) == 1
