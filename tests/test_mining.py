"""Consistency filtering, hard-negative mining and the training recipe loader, on real text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe2edge.compile.recipes import load_config, load_training_pairs
from tests.fixture_text import fixture_descriptions
from moe2edge.data.mining import consistency_filter, mine_hard_negatives, write_pairs
from moe2edge.data.readers import Pair, read_pairs


@pytest.fixture(scope="module")
def real_pairs():
    return [Pair(q, d, language="en") for q, d in fixture_descriptions(limit=60)]


def test_consistency_filter_keeps_exactly_the_top_k_pairs(minilm, real_pairs):
    kept, stats = consistency_filter(real_pairs, minilm, top_k=2)
    q = minilm.encode([p.query for p in real_pairs])
    d = minilm.encode([p.positive for p in real_pairs])
    s = q @ d.T
    rank = (s > np.diag(s)[:, None]).sum(1)
    expected = [p for p, r in zip(real_pairs, rank) if r < 2]
    assert kept == expected
    assert 0 < stats["kept"] < stats["input"] == len(real_pairs)
    # a shard size smaller than the set filters within each shard only: never stricter
    kept_sharded, _ = consistency_filter(real_pairs, minilm, top_k=2, shard_size=20)
    assert len(kept_sharded) >= len(kept)


def test_mined_negatives_respect_the_positive_aware_margin(minilm, real_pairs, tmp_path):
    out, stats = mine_hard_negatives(real_pairs, minilm, num_negatives=3, candidates=10, margin=0.95)
    assert stats["kept"] == len(out) > 0
    for p in out[:8]:
        assert len(p.negatives) == 3 and p.positive not in p.negatives
        e = minilm.encode([p.query, p.positive, *p.negatives])
        pos, negs = e[0] @ e[1], e[2:] @ e[0]
        assert (negs < 0.95 * pos + 1e-5).all()
    write_pairs(tmp_path / "mined.jsonl", out)
    assert read_pairs(tmp_path / "mined.jsonl") == out
    with pytest.raises(ValueError, match="margin"):
        mine_hard_negatives(real_pairs, minilm, margin=1.5)
    with pytest.raises(ValueError, match="no pairs"):
        consistency_filter([], minilm)


def test_recipe_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"init": {}, "trian": {}}))
    with pytest.raises(ValueError, match="unknown sections.*trian"):
        load_config(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="moe2edge data build"):
        load_training_pairs({"pairs": str(tmp_path / "missing.jsonl")})
    (tmp_path / "p.jsonl").write_text(json.dumps({"query": "a", "positive": "b", "language": "de"}) + "\n")
    with pytest.raises(ValueError, match="no pairs left"):
        load_training_pairs({"pairs": str(tmp_path / "p.jsonl"), "languages": ["en"]})


def test_default_recipe_is_valid():
    from moe2edge.compile.recipes import DEFAULT_CONFIG
    from moe2edge.teacher.train import TrainConfig

    cfg = load_config(DEFAULT_CONFIG)
    TrainConfig(**cfg["train"])
    assert cfg["init"]["upcycle"] == {"num_experts": 8, "top_k": 2, "every_n_layers": 2}
