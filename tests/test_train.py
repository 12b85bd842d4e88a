"""Trainer: GradCache == plain batch, exact resume, 2-process gloo == single process, bad input."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.fixture_text import fixture_descriptions
from moe2edge.data.readers import Pair
from moe2edge.teacher import NomicMoE, get_preset
from moe2edge.teacher.checkpoint import CheckpointError
from moe2edge.teacher.embedder import Embedder, Tokenizer, minilm_path
from moe2edge.teacher.train import TrainConfig, Trainer, param_groups


def tiny_embedder(seed: int = 0, **overrides) -> Embedder:
    """A small random MoE with the real MiniLM WordPiece tokenizer (fast, real text)."""
    torch.manual_seed(seed)
    cfg = get_preset("tiny-moe", vocab_size=30522, pad_token_id=0, max_seq_length=64, prompts={}, **overrides)
    return Embedder(NomicMoE(cfg), Tokenizer(minilm_path(), max_length=64, pad_id=0))


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    d = fixture_descriptions(limit=64)
    # hard negatives: the next descriptions in sorted order (real text, distinct packages)
    return [Pair(q, p, negatives=(d[(i + 1) % len(d)][1], d[(i + 2) % len(d)][1])) for i, (q, p) in enumerate(d)]


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_cache_gives_the_plain_batch_gradients(pairs):
    """In float64, so that "same gradients" is checked to 1e-9 instead of fp32 summation-order noise."""
    batch = pairs[:8]
    out = {}
    for chunk in (0, 3):
        emb = tiny_embedder()
        emb.model.double()
        cfg = TrainConfig(batch_size=8, hard_negatives=2, grad_cache_chunk=chunk, query_max_len=16, doc_max_len=32)
        tr = Trainer(emb, cfg)
        emb.model.train()
        res = tr.compute_gradients(batch)
        out[chunk] = (res, grads(emb.model))
    (r0, g0), (r1, g1) = out[0], out[3]
    assert r0.loss == pytest.approx(r1.loss, abs=1e-5)
    assert r0.aux == pytest.approx(r1.aux, abs=1e-6) and r0.aux > 0
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        assert (g0[n] - g1[n]).norm() <= 1e-9 * g0[n].norm() + 1e-12, n
    # the router learns from the aux loss too
    assert any("router" in n and g0[n].abs().sum() > 0 for n in g0)


def test_weight_decay_only_on_matrices():
    emb = tiny_embedder()
    decay, no_decay = param_groups(emb.model, 0.01)
    names = {id(p): n for n, p in emb.model.named_parameters()}
    assert all(p.dim() >= 2 and not names[id(p)].endswith("bias") for p in decay["params"])
    assert any(names[id(p)].endswith("experts.bias") for p in no_decay["params"])
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0


def test_interrupted_and_resumed_run_is_bit_identical(pairs, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, query_max_len=16, doc_max_len=32, save_every=2)
    straight = tiny_embedder()
    Trainer(straight, cfg, out_dir=tmp_path / "a").fit(pairs, progress=False)

    first = tiny_embedder()
    Trainer(first, cfg, out_dir=tmp_path / "b").fit(pairs, stop_after=2, progress=False)  # "killed" after step 2
    ckpt = tmp_path / "b" / "checkpoint-2"
    assert (ckpt / "trainer_state.pt").exists() and (ckpt / "model.safetensors").exists()
    resumed = tiny_embedder(seed=123)  # different init: everything must come from the checkpoint
    Trainer(resumed, cfg, out_dir=tmp_path / "b").fit(pairs, resume_from=ckpt, progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.layers.1.mlp.router.layer.weight"],
                           tiny_embedder().model.state_dict()["encoder.layers.1.mlp.router.layer.weight"])


def test_resume_from_another_config_fails_before_compute(pairs, tmp_path):
    cfg = TrainConfig(steps=2, batch_size=8, query_max_len=16, doc_max_len=32, save_every=1)
    Trainer(tiny_embedder(), cfg, out_dir=tmp_path).fit(pairs, stop_after=1, progress=False)
    other = TrainConfig(steps=2, batch_size=8, lr=5e-5, query_max_len=16, doc_max_len=32)
    with pytest.raises(CheckpointError, match="another config.*lr"):
        Trainer(tiny_embedder(), other).fit(pairs, resume_from=tmp_path / "checkpoint-1", progress=False)
    with pytest.raises(CheckpointError, match="model config differs"):
        Trainer(tiny_embedder(num_experts=4), cfg).fit(pairs, resume_from=tmp_path / "checkpoint-1", progress=False)


def test_bad_training_input_is_a_clear_error(pairs):
    emb = tiny_embedder()
    with pytest.raises(ValueError, match="empty"):
        Trainer(emb, TrainConfig(batch_size=4)).fit([], progress=False)
    with pytest.raises(ValueError, match="larger than the 3 training pairs"):
        Trainer(emb, TrainConfig(batch_size=8)).fit(pairs[:3], progress=False)
    no_negs = [Pair(p.query, p.positive) for p in pairs]
    with pytest.raises(ValueError, match="fewer than hard_negatives=2"):
        Trainer(emb, TrainConfig(batch_size=8, hard_negatives=2)).fit(no_negs, progress=False)
    with pytest.raises(ValueError, match="no negative"):
        TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exponential")


# ------------------------------------------------------------------------------ 2 processes, gloo


def _rank_main(rank, world, port, batch, scale, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        emb = tiny_embedder()
        emb.model.double()  # float64: equality is checked beyond fp32 summation-order noise
        tr = Trainer(emb, TrainConfig(batch_size=len(batch), hard_negatives=1, loss_scale=scale,
                                      query_max_len=16, doc_max_len=32))
        emb.model.train()
        res = tr.compute_gradients(batch)
        loss = torch.tensor([res.loss], dtype=torch.float64)
        dist.all_reduce(loss)  # mean of the ranks' local mean losses = global mean loss
        if rank == 0:
            # numpy: pickled by value (torch tensors would go through shared memory that dies with us)
            q.put((loss.item() / world, {n: g.numpy() for n, g in grads(emb.model).items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["none", "world_size"])
def test_two_process_gloo_equals_single_process(pairs, scale):
    batch = pairs[:8]
    single = tiny_embedder()
    single.model.double()
    tr = Trainer(single, TrainConfig(batch_size=8, hard_negatives=1, query_max_len=16, doc_max_len=32))
    single.model.train()
    ref = tr.compute_gradients(batch)
    g_ref = grads(single.model)

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, batch, scale, q)) for r in range(2)]
    for p in procs:
        p.start()
    loss, g_dist = q.get(timeout=300)
    g_dist = {n: torch.from_numpy(g) for n, g in g_dist.items()}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert loss == pytest.approx(ref.loss, abs=1e-9)
    factor = 2.0 if scale == "world_size" else 1.0  # the spec's "* world size" scales every gradient by W
    assert g_ref.keys() == g_dist.keys()
    assert any("router" in n for n in g_ref)  # the global-batch load-balancing loss is included
    for n in g_ref:
        assert (g_dist[n] - factor * g_ref[n]).norm() <= 1e-9 * factor * g_ref[n].norm() + 1e-12, n


def test_activation_checkpointing_gives_the_same_gradients(pairs, monkeypatch):
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = {}
    for ckpt in (False, True):
        emb = tiny_embedder()
        emb.model.double()
        tr = Trainer(emb, TrainConfig(batch_size=8, gradient_checkpointing=ckpt, query_max_len=16, doc_max_len=32))
        emb.model.train()
        tr.compute_gradients(pairs[:8])
        out[ckpt] = grads(emb.model)
    assert len(calls) == 2 * 4  # checkpointed: both passes x 4 blocks, only when asked
    assert out[False].keys() == out[True].keys()
    for n in out[False]:
        assert (out[False][n] - out[True][n]).norm() <= 1e-9 * out[False][n].norm() + 1e-12, n


# ------------------------------------------------------------------------------ distillation under DDP


def _distill_rank(rank, world, port, pairs, steps, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        q.put((rank, _distill_proj(pairs, steps, seed=rank)))  # a different init per rank: rank 0's must win
    finally:
        dist.destroy_process_group()


def _distill_proj(pairs, steps, seed=0):
    """Distil a 32-d tiny student into a 64-d tiny teacher (so a projection head is trained); -> its weight
    before and after."""
    from moe2edge.student.distill import DistillLoss, distill

    teacher = tiny_embedder(seed=100)
    student = tiny_embedder(seed=7, hidden_size=32, intermediate_size=64, matryoshka_dims=(32, 16))
    teacher.model.double()
    student.model.double()
    torch.manual_seed(seed)  # the projection's orthogonal init draws from here
    import moe2edge.student.distill as sd

    captured = {}
    real = sd.Distiller.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        self.proj.double()
        captured["proj"], captured["start"] = self.proj, self.proj.weight.detach().numpy().copy()

    sd.Distiller.__init__ = init
    try:
        distill(student, teacher, pairs, train=TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=0,
                                                           loss_scale="none", query_max_len=16, doc_max_len=32),
                loss=DistillLoss(similarity_weight=0.0), progress=False)  # KL: per-rank in-batch, not global
    finally:
        sd.Distiller.__init__ = real
    return captured["start"], captured["proj"].weight.detach().numpy().copy()


@pytest.mark.slow
def test_distillation_projection_trains_under_ddp(pairs):
    """2 gloo ranks: the projection head starts from rank 0's weights, its gradients are averaged, so both
    ranks end with the same head -- equal to the single-process run on the same global batches."""
    import socket

    import numpy as np

    steps = 2
    start, single = _distill_proj(pairs[:16], steps)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_distill_rank, args=(r, 2, port, pairs[:16], steps, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = {r: w[1] for r, w in (q.get(timeout=300) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert not np.allclose(single, start)  # the head did train
    np.testing.assert_array_equal(got[0], got[1])  # ranks identical
    np.testing.assert_allclose(got[0], single, rtol=0, atol=1e-9)  # and equal to one process
