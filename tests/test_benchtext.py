"""The frozen latency text set (benchmarks/benchtext-v1) and the rule that every text is timed once."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from moe2edge.data.benchtext import DEFAULT_DIR, MAX_TOKENS, MIN_TOKENS, load_bench_texts, split_for_latency


def test_frozen_set_is_varying_multilingual_and_unique():
    rows = load_bench_texts()
    toks = sorted(r["tokens"] for r in rows)
    assert len(rows) >= 350 and MIN_TOKENS <= toks[0] and toks[-1] <= MAX_TOKENS
    assert 120 <= toks[len(toks) // 2] <= 140  # ~128 median: the fixed-shape length
    assert len({r["language"] for r in rows}) >= 12
    assert len({r["text"] for r in rows}) == len(rows) and len({r["group"] for r in rows}) == len(rows)
    first = [r["language"] for r in rows[:40]]
    assert len(set(first)) >= 8  # languages interleaved, not one language per slice


def test_tampered_set_is_refused(tmp_path):
    d = tmp_path / "bt"
    shutil.copytree(DEFAULT_DIR, d)
    raw = bytearray((d / "texts.jsonl.gz").read_bytes())
    raw[-9] ^= 1
    (d / "texts.jsonl.gz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        load_bench_texts(d)


def test_split_slices_are_disjoint():
    texts = [f"t{i}" for i in range(100)]
    plan = split_for_latency(texts, repeats={1: 5, 32: 2})
    flat = plan["warmup"] + [t for b in plan[1] for t in b] + [t for b in plan[32] for t in b]
    assert len(flat) == len(set(flat)) == 2 + 5 + 64
    assert [len(b) for b in plan[32]] == [32, 32]
    with pytest.raises(ValueError, match="too few"):
        split_for_latency(texts[:20], repeats={1: 5, 32: 2})


class _Recorder:
    dim = 4

    def __init__(self):
        self.calls = []

    def encode(self, texts, batch_size=32, **_):
        self.calls.append(list(texts))
        return np.ones((len(texts), 4), np.float32)

    def set_num_threads(self, n):
        pass

    def count_tokens(self, texts):
        return len(texts.split()) if isinstance(texts, str) else [len(t.split()) for t in texts]


def test_real_latency_times_every_text_once():
    from moe2edge.data.evaluate import measure_latency_real

    m = _Recorder()
    texts = [f"text number {i}" for i in range(300)]
    lat = measure_latency_real(m, texts, threads=[1, 2], repeats={1: 6, 32: 2})
    seen = [t for c in m.calls for t in c]
    assert len(seen) == len(set(seen)) == 2 * (2 + 6 + 64)  # two thread counts, disjoint slices
    assert lat["threads=1"]["batch=1"]["n"] == 6 and lat["threads=2"]["batch=32"]["n"] == 2
    assert "texts_reused" not in lat and lat["tokens"]["median"] == 3
