"""Report: Markdown + self-contained HTML with an embedded PNG, one row per model."""

import base64
import json

import pytest

from moe2edge.data.report import load_results, render_report


def _run(name, ndcg, p50, lang_scores):
    per = {k: {"ndcg@10": v, "recall@100": v, "mrr@10": v, "n_queries": 10} for k, v in lang_scores.items()}
    return {"schema": "moe2edge.eval/v1", "model": {"name": name, "kind": "dense", "params": 22_000_000,
                                                    "size_bytes": 90 * 2**20, "dim": 384},
            "dataset": {"name": "tiny", "n_docs": 5, "n_queries": 20, "n_evaluated": 20},
            "metrics": {"overall": {"ndcg@10": ndcg, "recall@100": 0.9, "mrr@10": 0.6, "n_queries": 20},
                        "per_language": per},
            "latency": {"threads=1": {"batch=1": {"p50_ms": p50, "p95_ms": p50 * 1.2, "n": 5},
                                      "batch=32": {"p50_ms": p50 * 20, "p95_ms": p50 * 22, "n": 3}},
                        "threads=2": {"batch=1": {"p50_ms": p50 / 2, "p95_ms": p50, "n": 5}}},
            "memory": {"peak_rss_mb": 512.0}, "warnings": []}


def test_report_files(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"runs": [_run("teacher", 0.8, 40.0, {"en": 0.9, "de": 0.7})]}))
    b = tmp_path / "b.json"
    student = _run("student", 0.7, 8.0, {"en": 0.8, "de": 0.6})
    student["agreement"] = {"topk_overlap": 0.75, "teacher": "teacher"}
    b.write_text(json.dumps(student))  # a single run (no "runs" wrapper) is accepted too
    files = render_report(load_results([a, b]), tmp_path / "out")
    md = files["md"].read_text()
    assert "| teacher | dense | 22.0M | 90.0 | 0.800 | 0.900 | 0.700 |" in md
    assert "| student |" in md and "0.750 (teacher)" in md and "de (n=10)" in md
    png = files["png"].read_bytes()
    assert png.startswith(b"\x89PNG")
    page = files["html"].read_text()
    assert base64.b64encode(png).decode() in page and "<td>student</td>" in page
    assert not list((tmp_path / "out").glob(".*tmp*"))  # atomic writes leave no temp files


def test_bad_results_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="x.json:1: not valid JSON"):
        load_results([p])
    p.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a moe2edge eval result"):
        load_results([p])
    with pytest.raises(FileNotFoundError):
        load_results([tmp_path / "missing.json"])
    with pytest.raises(ValueError, match="no evaluation runs"):
        render_report([], tmp_path)


def test_latency_descriptors_and_extra_sections(tmp_path):
    """measure_latency writes seq_len / tokens_exact / unit beside the timings (BM25: tokens_exact False): a
    report of its output is accepted; extra tables and notes (the demo's router load) are rendered."""
    run = _run("bm25", 0.5, 1.0, {"en": 0.8, "de": 0.3})
    run["latency"].update(seq_len=128, tokens_exact=False, unit="ms per batch")
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"runs": [run]}))
    files = render_report(load_results([a]), tmp_path / "out", notes=["a note"],
                          sections=[("Router load", ["layer", "e0"], [["1", "0.500"]])])
    md = files["md"].read_text()
    assert "## Router load" in md and "| 1 | 0.500 |" in md and "- a note" in md
    assert "<h2>Router load</h2>" in files["html"].read_text()
