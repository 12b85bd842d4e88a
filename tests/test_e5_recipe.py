"""The e5 teacher recipe's pieces: one-pass filter + mining, same-query negatives, centred routers, configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe2edge.compile.recipes import load_config
from tests.fixture_text import fixture_descriptions
from moe2edge.data.mining import CachedEncoder, consistency_filter, mine_hard_negatives, prepare_pairs
from moe2edge.data.readers import Pair

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_pairs():
    return [Pair(q, d, language="en") for q, d in fixture_descriptions(limit=60)]


class Counting:
    """An encoder that counts the texts it embeds."""

    def __init__(self, inner):
        self.inner, self.n = inner, 0

    def encode(self, texts, **kw):
        self.n += len(texts)
        return self.inner.encode(texts, **kw)


def test_prepare_equals_filter_then_mine_and_embeds_each_text_once(minilm, real_pairs):
    kept, _ = consistency_filter(real_pairs, minilm, top_k=2)
    expected, _ = mine_hard_negatives(kept, minilm, num_negatives=1, candidates=10, margin=0.95)
    enc = Counting(minilm)
    got, stats = prepare_pairs(real_pairs, enc, filter_top_k=2, negatives=1, candidates=10, margin=0.95)
    assert got == expected and stats["output"] == len(got) and stats["input"] == len(real_pairs)
    n_unique = len({p.query for p in real_pairs}) + len({p.positive for p in real_pairs})
    assert enc.n == n_unique  # the mining pass re-used the filter's embeddings
    c = CachedEncoder(minilm)
    np.testing.assert_array_equal(c.encode(["a b", "c"], prompt=None), minilm.encode(["a b", "c"]))


def test_a_document_paired_with_the_same_query_is_never_its_negative(minilm, real_pairs):
    # Debian pairs a translated short description with its translated AND its English long text:
    # the second positive of a query must not come back as that query's hard negative.
    twin = [Pair(p.query, real_pairs[(i + 1) % len(real_pairs)].positive, language="en") for i, p in enumerate(real_pairs[:10])]
    pairs = real_pairs + twin
    out, stats = mine_hard_negatives(pairs, minilm, num_negatives=2, candidates=15, margin=1.0)
    positives = {}
    for p in pairs:
        positives.setdefault(p.query, set()).add(p.positive)
    assert all(not (set(p.negatives) & positives[p.query]) for p in out)
    assert stats["candidates_paired_with_query"] > 0  # the rule fired (it can fail)


def test_centred_routers_keep_the_exact_start_and_balance_load(minilm):
    from moe2edge.teacher import expert_load, upcycle
    from moe2edge.teacher.router_init import center_routers

    texts = [f"{q} {d}" for q, d in fixture_descriptions(limit=24)]
    ids, mask, _ = minilm.tokenizer(texts)
    moe = upcycle(minilm.model, keep_biases=True, normalize=True, router_std=0.02)
    with torch.no_grad():
        before = moe.embed(ids, mask).embeddings
    mins = center_routers(moe, ids, mask)
    with torch.no_grad():
        out = moe.embed(ids, mask)
    assert (out.embeddings - before).abs().max() <= 1e-5  # routing does not change the exact start
    assert min(mins) > 0 and expert_load(out.router_stats).min() > 0
    # each router is now orthogonal to the mean of its inputs (measured again through a hook)
    mlp = moe.encoder.layers[1].mlp
    seen = {}
    h = mlp.register_forward_pre_hook(lambda m, a: seen.update(x=a[0][mask.bool()].mean(0)))  # returns None
    with torch.no_grad():
        moe(ids, mask)
    h.remove()
    mu = seen["x"] / seen["x"].norm()
    assert (mlp.router.layer.weight @ mu).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["e5-moe", "e5-dense-baseline"])
def test_e5_recipes_are_valid_and_matched(name):
    from moe2edge.teacher.train import TrainConfig

    cfg = load_config(ROOT / "configs" / f"{name}.json")
    TrainConfig(**cfg["train"])
    assert cfg["init"]["checkpoint"] == "e5-small"
    assert len(cfg["data"]["languages"]) == 17 and cfg["data"]["prepare"]["model"] == "e5-small"
    if name == "e5-dense-baseline":  # same data, steps and schedule as the MoE recipe; no upcycling
        moe = load_config(ROOT / "configs" / "e5-moe.json")
        assert cfg["init"]["upcycle"] is None
        assert cfg["data"] == moe["data"] and cfg["train"] == moe["train"]
    else:
        up = cfg["init"]["upcycle"]
        assert (up["num_experts"], up["top_k"], up["every_n_layers"]) == (8, 2, 2)  # 6 of 12 layers, as released


def test_unknown_router_init_and_prepare_keys_are_errors(tmp_path):
    from moe2edge.compile.recipes import build_model, prepared_pairs

    with pytest.raises(ValueError, match="router_init"):
        build_model({"checkpoint": "minilm", "upcycle": {"router_init": "zeros"}})
    with pytest.raises(ValueError, match="unknown keys.*negativs"):
        prepared_pairs([Pair("a", "b")], {"negativs": 1}, cache_dir=tmp_path)
    assert json.loads((ROOT / "configs" / "e5-moe.json").read_text())["init"]["upcycle"]["router_init"] == "centered"


@pytest.mark.parametrize("kind", ["pruned", "dense", "static"])
def test_e5_student_recipes_are_valid_and_multilingual(kind):
    from moe2edge.student.recipe import load_recipe, validate_recipe

    cfg = validate_recipe(load_recipe(ROOT / "configs" / f"student-e5-{kind}.json"))
    assert cfg["student"]["kind"] == kind
    assert cfg["data"]["languages"] == load_config(ROOT / "configs" / "e5-moe.json")["data"]["languages"]
    if kind == "static":
        assert cfg["student"]["vocab"] == "corpus"  # e5's 250k rows: only those the corpus uses
