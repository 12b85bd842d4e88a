"""Data-aware router start for an upcycled MoE: remove the shared direction of the router inputs.

Measured on multilingual-e5-small upcycled with the authors' router N(0, 0.02): the hidden states
entering each MoE FFN share a large common component (BERT-family outlier dimensions), so every
token's router logits carry the same offset ``W mu`` and the same two experts win almost everywhere
(step-0 load per expert 0.00-0.41; a dead expert). Projecting the mean input direction ``mu`` out of
each router row (``W <- W (I - mu mu^T / |mu|^2)``) leaves the router random but lets the
token-specific part of the input decide, so load starts near uniform. With the exact-start
upcycling (biases kept, top-k renormalised, identical experts) the model's output does not depend on
routing at step 0, so this changes no embedding.

Dimension legend: N calibration tokens, D hidden size, E experts.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


@torch.no_grad()
def center_routers(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[float]:
    """Project each MoE router off the mean of its real-token inputs; returns the step-0 min load per layer."""
    from moe2edge.teacher.model import MoEMLP, expert_load

    layers = [b.mlp for b in model.encoder.layers if isinstance(b.mlp, MoEMLP)]
    if not layers:
        raise ValueError("center_routers needs an MoE model")
    means: dict[int, torch.Tensor] = {}
    real = attention_mask.bool()

    def hook(i):
        def f(mod, args):
            h = args[0]  # (B, S, D) the FFN input
            means[i] = h[real].mean(0)  # (D,)
        return f

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        model(input_ids, attention_mask)
    finally:
        for h in handles:
            h.remove()
    for i, m in enumerate(layers):
        mu = means[i] / means[i].norm().clamp(min=1e-12)  # (D,)
        W = m.router.layer.weight  # (E, D)
        W.sub_(torch.outer(W @ mu, mu))
    load = expert_load(model.embed(input_ids, attention_mask).router_stats)  # (L, E)
    model.train(was_training)
    mins = load.min(-1).values.tolist()
    log.info("routers centred on %d tokens: step-0 min expert load per MoE layer %s", int(real.sum()),
             " ".join(f"{x:.3f}" for x in mins))
    return mins
