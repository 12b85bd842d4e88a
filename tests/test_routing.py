"""Router near-ties (targets/routing.py) and how verification gates fp32 around them (targets/build.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moe2edge.targets.base import CompileConfig  # noqa: E402
from moe2edge.targets.build import near_tie_parity  # noqa: E402
from moe2edge.targets.routing import RouterTap, margins  # noqa: E402


def test_margin_is_the_gap_between_kth_and_next_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.4, 0.2, 0.2, 0.2]]))
    m = margins(logits, 2)
    assert m[0].item() == pytest.approx(0.15) and m[1].item() == pytest.approx(0.0, abs=1e-7)
    assert margins(logits, 1)[0].item() == pytest.approx(0.2)


def test_tap_counts_real_near_tie_tokens_per_text_in_input_order():
    from moe2edge.teacher import NomicMoE, get_preset
    from moe2edge.targets.runtime import length_order

    torch.manual_seed(0)
    model = NomicMoE(get_preset("tiny-moe")).eval()
    n_moe = len(model.config.moe_layers)
    assert n_moe >= 1
    # Layer 1's router: all-equal logits (every token a tie) -> each real token counts once per such layer.
    tied_layer = [m for m in model.modules() if hasattr(m, "router")][0]
    torch.nn.init.zeros_(tied_layer.router.layer.weight)
    texts = ["bb", "a", "cccc"]  # lengths 2, 1, 4 real tokens
    lens = np.array([len(t) for t in texts])
    order = length_order(texts)
    ids = torch.randint(5, 500, (3, 4))
    mask = torch.tensor([[1] * lens[i] + [0] * (4 - lens[i]) for i in order])
    tap = RouterTap(model, eps=1e-5)
    with tap, torch.no_grad():
        tap.wrap(lambda i, m: model.embed(i, m).embeddings)(ids, mask)
    count, margin = tap.take(texts)
    assert count.tolist() == lens.tolist()  # pads never count; back in the order of ``texts``
    assert np.all(margin == 0)
    # Outside the context manager the hooks are gone.
    with torch.no_grad():
        model.embed(ids, mask)
    assert tap.take(texts)[0].tolist() == [0, 0, 0]


def _rows(n=40, seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, 16)).astype(np.float32)
    return ref / np.linalg.norm(ref, axis=1, keepdims=True)


def test_fp32_gates_on_clean_texts_and_reports_near_tie_texts_apart():
    ref = _rows()
    got = ref.copy()
    near = np.zeros(len(ref), np.int64)
    near[[3, 7]] = [2, 1]
    got[[3, 7]] = _rows(2, seed=1)  # a flipped expert: these texts move a lot
    res, pair_ok = near_tie_parity(ref, got, near, np.full(len(ref), 0.01), n_pairs=20, cfg=CompileConfig())
    assert res["cos_min"] == pytest.approx(1.0, abs=1e-6) and res["n"] == 38
    assert res["near_tie_texts"]["n"] == 2 and res["near_tie_texts"]["cos_min"] < 0.99
    assert res["all_texts"]["cos_min"] < 0.99 and "_problems" not in res
    assert res["near_tie"]["tokens"] == 3 and res["near_tie"]["texts"] == 2
    assert pair_ok.sum() == 18  # queries 3 and 7 are excluded from nDCG
    # INT8 is gated on every text; too few clean texts refuse fp32.
    res8, _ = near_tie_parity(ref, got, near, near * 0.0, n_pairs=20, cfg=CompileConfig(precision="int8"))
    assert res8["n"] == 40 and res8["cos_min"] < 0.99
    near[:] = 1
    near[0] = 0
    res, _ = near_tie_parity(ref, got, near, near * 0.0, n_pairs=20, cfg=CompileConfig())
    assert "too few to verify fp32" in res["_problems"][0]
