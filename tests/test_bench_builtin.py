"""`moe2edge bench --builtin`: baselines by name, each in its own process; BM25 is timed as a search."""

from __future__ import annotations

import pytest

from moe2edge.targets.bench import BenchError, _load, bench


def test_bm25_is_timed_as_search_in_its_own_process():
    rep = bench([], builtins=["bm25"], repeats={1: 2, 32: 1}, fixed=False)
    (r,) = rep["results"]
    assert r["name"] == "bm25" and r["target"] == "search" and r["runtime"] == "bm25s"
    cell = r["latency"]["threads=1"]["batch=1"]
    assert cell["n"] == 2 and cell["p50_ms"] > 0
    assert r["model_bytes"] > 0  # the index over the frozen benchmark's corpus was built
    assert rep["texts"]["timed"] == 2 + 32  # each text once: 2 calls at batch 1, 1 at batch 32


def test_unknown_builtin_is_one_line_error(tmp_path):
    with pytest.raises(BenchError, match="unknown built-in 'nope'"):
        _load("builtin", tmp_path / "nope", 1)
