"""Students: equivalences with copied weights, bad input, the static format, one distillation step."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixture_text import fixture_descriptions
from moe2edge.data.readers import Pair
from moe2edge.student import calibrate, densify, prune_experts
from moe2edge.student.distill import Distiller, DistillLoss, distill, load_student, manifest, save_student
from moe2edge.student.losses import embedding_loss, similarity_kl
from moe2edge.student.recipe import check_compatible, validate_recipe
from moe2edge.student.static import StaticEmbedder, distill_static, is_static, load_static
from moe2edge.teacher import NomicMoE, TeacherConfig, upcycle
from moe2edge.teacher.embedder import Embedder
from moe2edge.teacher.train import TrainConfig


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CI box is shared: one thread is the fastest and the most repeatable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def texts():
    return [long[:240] for _, long in fixture_descriptions(limit=24)]


@pytest.fixture(scope="module")
def pairs():
    return [Pair(query=s, positive=long[:300], language="en") for s, long in fixture_descriptions(limit=32)]


def _perturb_experts(moe: NomicMoE, seed: int = 0) -> NomicMoE:
    """Make the upcycled experts (identical copies) differ, and the shared bias non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in moe.config.moe_layers:
            mlp = moe.encoder.layers[i].mlp
            for p in (mlp.experts.mlp.w1, mlp.experts.mlp.w2):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
            mlp.experts.bias.add_(torch.randn(mlp.experts.bias.shape, generator=g) * 0.05)
            mlp.router.layer.weight.mul_(50)  # a peaked router, as after training
    return moe


@pytest.fixture(scope="module")
def moe(minilm):
    return _perturb_experts(upcycle(minilm.model, seed=0).eval())


@pytest.fixture(scope="module")
def calib(moe, minilm, texts):
    return calibrate(moe, minilm.tokenizer, texts, max_tokens=600)


def _pooled(model, tok, texts):
    ids, mask, _ = tok(texts)
    with torch.no_grad():
        return model.embed(ids, mask).pooled


# ----------------------------------------------------------------------------- equivalences


def test_pruned_keeping_everything_is_the_teacher(moe, calib, minilm, texts):
    ref = _pooled(moe, minilm.tokenizer, texts[:8])
    for score in ("router", "output_norm"):
        for merge in (False, True):
            student = prune_experts(moe, calib, num_experts=8, top_k=2, score=score, merge=merge)
            assert student.config == moe.config
            for (n, a), (_, b) in zip(student.state_dict().items(), moe.state_dict().items()):
                assert torch.equal(a, b), (score, merge, n)  # copied weights: exact
    assert torch.equal(_pooled(student, minilm.tokenizer, texts[:8]), ref)


def test_dense_from_identical_experts_equals_the_moe(minilm, texts):
    # keep_biases + normalize: every expert = the dense FFN (with b1), gate mass 1 -> MoE == dense parent
    moe = upcycle(minilm.model, keep_biases=True, normalize=True, seed=1).eval()
    cal = calibrate(moe, minilm.tokenizer, texts, max_tokens=400)
    dense = densify(moe, cal, init="merge", rescale=False)
    assert not dense.config.moe_layers
    tok = minilm.tokenizer
    ref = _pooled(moe, tok, texts[:8])
    torch.testing.assert_close(_pooled(dense, tok, texts[:8]), ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(_pooled(dense, tok, texts[:8]), _pooled(minilm.model, tok, texts[:8]), rtol=0, atol=2e-5)
    # "top" init picks one of the identical experts: same function
    top = densify(moe, cal, init="top", rescale=False)
    torch.testing.assert_close(_pooled(top, tok, texts[:8]), ref, rtol=0, atol=2e-5)
    # pruning + merging identical experts with renormalised gates is also exact
    pr = prune_experts(moe, cal, num_experts=3, top_k=1, merge=True, rescale=False)
    torch.testing.assert_close(_pooled(pr, tok, texts[:8]), ref, rtol=0, atol=2e-5)


def test_rescale_restores_the_gate_mass(minilm, texts):
    # released (non-renormalised) top-2 -> top-1 shrinks the MoE output; the folded scale undoes it
    moe = upcycle(minilm.model, seed=2).eval()
    with torch.no_grad():
        for i in moe.config.moe_layers:
            moe.encoder.layers[i].mlp.router.layer.weight.mul_(20)
    cal = calibrate(moe, minilm.tokenizer, texts, max_tokens=400)
    tok = minilm.tokenizer
    ref = torch.nn.functional.normalize(_pooled(moe, tok, texts[:16]), dim=-1)

    def cos(m):
        return float((torch.nn.functional.normalize(_pooled(m, tok, texts[:16]), dim=-1) * ref).sum(-1).mean())

    raw = prune_experts(moe, cal, num_experts=4, top_k=1, rescale=False)
    fixed = prune_experts(moe, cal, num_experts=4, top_k=1, rescale=True)
    assert all(c > 1.0 for c in fixed.pruning["output_scale"].values())
    assert cos(fixed) > cos(raw)
    d_raw, d_fixed = densify(moe, cal, rescale=False), densify(moe, cal, rescale=True)
    assert cos(d_fixed) > cos(d_raw)


def test_pruning_keeps_the_best_scored_experts_and_remaps_the_router(moe, calib):
    student = prune_experts(moe, calib, num_experts=3, top_k=1, rescale=False)
    for i in moe.config.moe_layers:
        keep = student.pruning["kept_experts"][str(i)]
        best = sorted(torch.topk(calib.layers[i].score("router"), 3).indices.tolist())
        assert keep == best
        src, dst = moe.encoder.layers[i].mlp, student.encoder.layers[i].mlp
        assert torch.equal(dst.router.layer.weight, src.router.layer.weight[keep])
        assert torch.equal(dst.experts.mlp.views()[0], src.experts.mlp.views()[0][keep])
    assert student.config.num_experts == 3 and student.config.moe_top_k == 1


def test_dense_student_layers_and_width(moe, calib, minilm, texts):
    d = densify(moe, calib, layers=[0, 2, 4], intermediate_size=256)
    assert d.config.num_layers == 3 and d.config.intermediate_size == 256 and not d.config.moe_layers
    assert torch.equal(d.encoder.layers[1].attn.Wqkv.weight, moe.encoder.layers[2].attn.Wqkv.weight)
    assert torch.isfinite(_pooled(d, minilm.tokenizer, texts[:4])).all()


def test_refit_reconstructs_the_wide_ffn_better_than_dropping_units(moe, calib):
    """Least-squares refit of the narrow FFN's fc2: lower error on the calibration tokens than keeping the
    dropped-units fc2, at both a dense layer (0) and an MoE layer (1); exact when nothing is dropped."""
    import torch.nn.functional as F

    from moe2edge.student.calibration import moe_output
    from moe2edge.student.dense import refit_fc2

    @torch.no_grad()
    def err(student, j, i):
        x = calib.layers[i].inputs
        mlp = moe.encoder.layers[i].mlp
        want = moe_output(mlp, x) + mlp.experts.bias if moe.config.is_moe_layer(i) else mlp(x)[0]
        got = student.encoder.layers[j].mlp(x)[0]
        return float((got - want).norm() / want.norm())

    plain = densify(moe, calib, layers=[0, 1], intermediate_size=96, rescale=True)
    refit = densify(moe, calib, layers=[0, 1], intermediate_size=96, rescale=True, refit=True)
    for j, i in ((0, 0), (1, 1)):
        e_plain, e_refit = err(plain, j, i), err(refit, j, i)
        assert e_refit < 0.8 * e_plain, (i, e_plain, e_refit)
        assert refit.densify["per_layer"][str(i)]["refit_rel_error"] == pytest.approx(e_refit, rel=1e-2, abs=1e-4)
    # With every unit kept the solve recovers the dense layer exactly (h has full column rank here).
    fc = moe.encoder.layers[0].mlp
    h = F.gelu(calib.layers[0].inputs @ fc.fc1.weight.t() + fc.fc1.bias)
    w, b, e = refit_fc2(h, fc(calib.layers[0].inputs)[0], ridge=0.0)
    assert e < 1e-4


# ----------------------------------------------------------------------------- bad input


def test_bad_pruning_requests_are_clear_errors(moe, calib, minilm, texts):
    with pytest.raises(ValueError, match=r"num_experts=0 must be in \[1, 8\]"):
        prune_experts(moe, calib, num_experts=0)
    with pytest.raises(ValueError, match=r"num_experts=9 must be in \[1, 8\]"):
        prune_experts(moe, calib, num_experts=9)
    with pytest.raises(ValueError, match=r"top_k=3 must be in \[1, num_experts=2\]"):
        prune_experts(moe, calib, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="unknown expert score"):
        prune_experts(moe, calib, num_experts=2, score="magic")
    with pytest.raises(ValueError, match="no MoE layers"):
        prune_experts(minilm.model, calib, num_experts=2)
    other = calibrate(minilm.model, minilm.tokenizer, texts[:4], max_tokens=100)  # dense: no routing stats
    with pytest.raises(ValueError, match="recalibrate"):
        prune_experts(moe, other, num_experts=2)
    with pytest.raises(ValueError, match=r"layers \[6\] do not exist"):
        densify(moe, calib, layers=[0, 6])
    with pytest.raises(ValueError, match="increasing and unique"):
        densify(moe, calib, layers=[2, 0])
    with pytest.raises(ValueError, match=r"intermediate_size=0 must be in \[1, 1536\]"):
        densify(moe, calib, intermediate_size=0)


def test_incompatible_student_configs_are_rejected(moe, minilm):
    teacher = Embedder(moe, minilm.tokenizer)
    with pytest.raises(ValueError, match="needs an MoE teacher"):
        check_compatible(minilm, {"kind": "pruned", "num_experts": 2})
    with pytest.raises(ValueError, match=r"num_experts=16 must be in \[1, 8\]"):
        check_compatible(teacher, {"kind": "pruned", "num_experts": 16})
    with pytest.raises(ValueError, match=r"top_k=4 must be in \[1, num_experts=2\]"):
        check_compatible(teacher, {"kind": "pruned", "num_experts": 2, "top_k": 4})
    with pytest.raises(ValueError, match="the teacher has layers 0..5"):
        check_compatible(teacher, {"kind": "dense", "layers": [0, 8]})
    with pytest.raises(ValueError, match=r"student.dim=999 must be in \[1, 384\]"):
        check_compatible(teacher, {"kind": "static", "dim": 999})
    with pytest.raises(ValueError, match="do not apply to kind 'static'"):
        validate_recipe({"student": {"kind": "static", "num_experts": 4}})
    with pytest.raises(ValueError, match="student.kind must be one of"):
        validate_recipe({"student": {"kind": "sparse"}})
    with pytest.raises(ValueError, match="embedding_loss must be one of"):
        validate_recipe({"student": {"kind": "dense"}, "loss": {"embedding_loss": "l1"}})


def test_cli_flag_for_another_kind_is_an_error(tmp_path, capsys):
    from moe2edge.compile.cli import main

    rc = main(["distill", "--teacher", str(tmp_path), "--student", "static", "--out", str(tmp_path / "o"),
               "--experts", "4"])
    assert rc == 2
    assert "--experts does not apply to a static student" in capsys.readouterr().err


# ----------------------------------------------------------------------------- static student


@pytest.fixture(scope="module")
def small_vocab_teacher(minilm):
    """A 1-layer model with MiniLM's vocabulary and tokenizer: static distillation in a second."""
    cfg = TeacherConfig(vocab_size=30522, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                        type_vocab_size=2, position_embedding="learned", max_position_embeddings=512,
                        moe_every_n_layers=0, num_experts=0, pad_token_id=0, max_seq_length=128,
                        matryoshka_dims=(32, 16), prompts={})
    torch.manual_seed(0)
    return Embedder(NomicMoE(cfg).eval(), minilm.tokenizer)


def test_static_student_encode_and_round_trip(small_vocab_teacher, texts, tmp_path):
    st = distill_static(small_vocab_teacher, dim=16, weighting="sif", corpus=texts)
    assert st.table.shape == (30522, 16)
    e = st.encode(texts[:5])
    assert e.dtype == np.float32 and e.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    ids = st.tok.encode(texts[0]).ids  # the mean of the token rows, normalised
    manual = st.table[ids].mean(0)
    np.testing.assert_allclose(e[0], manual / np.linalg.norm(manual), atol=1e-6)
    e8 = st.encode(texts[:5], dim=8)
    manual8 = st.table[ids, :8].mean(0)
    np.testing.assert_allclose(e8[0], manual8 / np.linalg.norm(manual8), atol=1e-6)
    # same call signature as the teacher's Embedder.encode
    sig = lambda f: [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]  # noqa: E731
    assert sig(StaticEmbedder.encode) == sig(Embedder.encode)
    st.save(tmp_path / "static", manifest={"kind": "static"})
    assert is_static(tmp_path / "static")
    back = load_student(tmp_path / "static")
    assert isinstance(back, StaticEmbedder)
    np.testing.assert_array_equal(back.encode(texts[:5]), e)
    assert json.loads((tmp_path / "static" / "student_manifest.json").read_text())["kind"] == "static"
    with pytest.raises(ValueError, match="dim must be in"):
        st.encode(texts[:1], dim=17)
    with pytest.raises(ValueError, match="weighting='sif' needs a corpus"):
        distill_static(small_vocab_teacher, dim=16, weighting="sif")
    with pytest.raises(ValueError, match=r"dim=64 must be in \[1, 32\]"):
        distill_static(small_vocab_teacher, dim=64, weighting="none")


def test_static_fast_tokenizer_path_equals_hf_tokenizers(texts):
    """The cached ASCII fast path gives exactly HF tokenizers' ids (controls, tabs, punctuation, long and
    unknown words, truncation); non-ASCII text falls back to HF."""
    from moe2edge.student.static import StaticConfig, StaticEmbedder
    from moe2edge.teacher import minilm_path

    st = StaticEmbedder(np.zeros((30522, 4), np.float32), Path(minilm_path()) / "tokenizer.json",
                        StaticConfig(vocab_size=30522, hidden_size=4, max_seq_length=24))
    assert st.fast.enabled
    tricky = ["", "   ", "Hello, World!!", "tab\there\nnew\rline", "ctrl\x00\x07\x1b\x7fchars", "a-b_c/d\\e|f~g`h",
              "x" * 150 + " tail", "MiXeD CaSe 3.14 e-mail@host.org (parens) [brackets] {braces}",
              "word " * 40, "qzxqvzxqv unknownish zzzzyyyy", "\x0b\x0cvt ff"] + [t[:200] for t in texts]
    for t in tricky:
        assert st.fast.ids(t, 24) == st.tok.encode(t).ids, repr(t)
    assert st.fast.ids("café", 24) is None  # non-ASCII: HF path
    assert st.token_ids(["café au lait", "plain"]) == [st.tok.encode("café au lait").ids, st.tok.encode("plain").ids]
    assert len(st.fast.cache) > 0


def test_static_table_trains_through_the_teacher_trainer(small_vocab_teacher, pairs, texts):
    st = distill_static(small_vocab_teacher, dim=16, weighting="zipf")
    emb = Embedder(st.to_model(), small_vocab_teacher.tokenizer)
    before = emb.model.embeddings.weight.detach().clone()
    hist = distill(emb, small_vocab_teacher, pairs, train=TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=0),
                   progress=False)
    assert len(hist) == 2 and "embedding" in hist[0] and np.isfinite(hist[-1]["loss"])
    assert not torch.equal(before, emb.model.embeddings.weight)  # dims differ (16 vs 32): projection used


# ----------------------------------------------------------------------------- distillation


def test_losses_are_zero_on_the_teacher_itself():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    assert float(embedding_loss(q, q)) == pytest.approx(0.0, abs=1e-6)
    assert float(embedding_loss(q, q, "mse")) == pytest.approx(0.0, abs=1e-6)
    assert float(similarity_kl(q, d, q, d)) == pytest.approx(0.0, abs=1e-6)
    assert float(similarity_kl(q, d, -q, d)) > 0


def test_contrastive_weight_zero_cancels_the_trainer_infonce(moe, minilm, pairs):
    from moe2edge.teacher.train import Trainer

    teacher = Embedder(moe, minilm.tokenizer)
    student = Embedder(upcycle(minilm.model, seed=3), minilm.tokenizer)
    dist = Distiller(teacher, DistillLoss(contrastive_weight=0.0, embedding_weight=0.0, similarity_weight=0.0),
                     student.model.config.hidden_size)
    tr = Trainer(student, TrainConfig(steps=1, batch_size=4), extra_loss=dist)
    dist.trainer = tr
    q = torch.randn(4, 384)
    d = torch.randn(4, 384)
    total, nce = tr._loss_from_pooled(q, d, pairs[:4])
    assert float(nce) > 0 and float(total) == pytest.approx(0.0, abs=1e-5)


def test_teacher_targets_are_cached_and_equal_to_a_fresh_forward(moe, minilm, pairs):
    from moe2edge.student.distill import pooled

    teacher = Embedder(moe, minilm.tokenizer)
    dist = Distiller(teacher, DistillLoss(), 384)
    docs = [p.positive for p in pairs[:6]]
    first = dist.targets(docs[:4], "search_document", 64)
    assert len(dist.cache) == 4 and dist.cache_hits == 0
    again = dist.targets(docs, "search_document", 64)  # 4 reused, 2 new, computed in another batch
    assert len(dist.cache) == 6 and dist.cache_hits == 4
    fresh = pooled(teacher, docs, "search_document", 64)
    torch.testing.assert_close(again, fresh, atol=1e-5, rtol=1e-5)  # padding differs: float noise only
    torch.testing.assert_close(again[:4], first, atol=0, rtol=0)
    dist.targets(docs[:2], "search_query", 64)  # another prompt is another target
    assert len(dist.cache) == 8


def test_pruned_student_distils_saves_with_lineage_and_loads(moe, calib, minilm, pairs, tmp_path):
    from moe2edge.teacher import load_embedder

    teacher = Embedder(moe, minilm.tokenizer)
    tdir = teacher.save(tmp_path / "teacher")
    student = Embedder(prune_experts(moe, calib, num_experts=2, top_k=1, merge=True), minilm.tokenizer)
    w0 = student.model.encoder.layers[1].mlp.experts.mlp.w1.detach().clone()
    hist = distill(student, teacher, pairs, train=TrainConfig(steps=1, batch_size=4, warmup_steps=0, doc_max_len=32),
                   progress=False)
    assert {"embedding", "similarity_kl", "contrastive"} <= set(hist[-1])
    assert not torch.equal(w0, student.model.encoder.layers[1].mlp.experts.mlp.w1)  # it learned
    m = manifest(kind="pruned", teacher_path=tdir, recipe={"student": {"kind": "pruned"}}, pairs=pairs,
                 calibration=calib.summary(), history=hist, student_model=student.model)
    out = save_student(student, tmp_path / "student", manifest_dict=m)
    saved = json.loads((out / "student_manifest.json").read_text())
    from moe2edge.teacher.checkpoint import checkpoint_hash

    assert saved["teacher"]["checkpoint_hash"] == checkpoint_hash(tdir)
    assert saved["data"]["pairs"] == len(pairs) and len(saved["data"]["pairs_sha256"]) == 64
    assert saved["pruning"]["kept_experts"]["1"] and saved["params"]["active_non_embedding"] > 0
    for loader in (load_embedder, load_student):
        back = loader(out)
        assert back.model.config.num_experts == 2 and back.model.config.moe_top_k == 1
        np.testing.assert_allclose(back.encode(["apt package manager"]), student.encode(["apt package manager"]),
                                   atol=1e-6)
