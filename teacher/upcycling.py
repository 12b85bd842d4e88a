"""Sparse upcycling: a dense checkpoint becomes an MoE whose experts all start as the dense FFN.

Spec section 3, the authors' way (contrastors): in each MoE layer every expert is a copy of the dense
FFN, ``w1 = fc1.weight.repeat(E, 1)``, ``w2 = fc2.weight.repeat(1, E).T``; the dense fc1/fc2 biases
are dropped, ``experts.bias`` starts at zero and the router at N(0, 0.02). Symmetry is broken only
by the router's randomness and the gradients.

``keep_biases=True`` with ``normalize=True`` instead keeps fc1's bias per expert (our extension
``experts.mlp.b1``) and fc2's as the shared bias, so the MoE computes exactly the dense model at
step 0 (tested).
"""

from __future__ import annotations

import logging

import torch

from moe2edge.teacher.model import NomicMoE

log = logging.getLogger(__name__)


def upcycle(
    dense: NomicMoE,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    every_n_layers: int = 2,
    keep_biases: bool = False,
    normalize: bool = False,
    router_std: float = 0.02,
    seed: int = 0,
) -> NomicMoE:
    """Return a new MoE model upcycled from ``dense`` (which is left untouched)."""
    cfg = dense.config
    if cfg.moe_layers:
        raise ValueError(f"upcycle() needs a dense model; this one already has MoE layers {cfg.moe_layers}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if every_n_layers < 1:
        raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
    new_cfg = cfg.replace(
        num_experts=num_experts, moe_top_k=top_k, moe_every_n_layers=every_n_layers,
        moe_normalize_expert_weights=normalize, moe_expert_fc1_bias=keep_biases,
    )
    if not new_cfg.moe_layers:
        raise ValueError(f"every_n_layers={every_n_layers} gives no MoE layer in a {cfg.num_layers}-layer model")
    with torch.device("meta"):
        moe = NomicMoE(new_cfg)
    src = dense.state_dict()
    gen = torch.Generator().manual_seed(seed)
    E, H = num_experts, cfg.hidden_size
    new_state = {}
    for name, t in moe.state_dict().items():
        if name in src:
            new_state[name] = src[name].detach().clone()
            continue
        layer = name.split(".")[2]
        p = f"encoder.layers.{layer}.mlp."
        fc1_w, fc1_b = src[p + "fc1.weight"], src[p + "fc1.bias"]  # (F, H), (F,)
        fc2_w, fc2_b = src[p + "fc2.weight"], src[p + "fc2.bias"]  # (H, F), (H,)
        if name.endswith("experts.mlp.w1"):
            new_state[name] = fc1_w.repeat(E, 1).clone()  # (E*F, H)
        elif name.endswith("experts.mlp.w2"):
            new_state[name] = fc2_w.repeat(1, E).t().contiguous()  # (H, E*F) -> (E*F, H)
        elif name.endswith("experts.mlp.b1"):
            new_state[name] = fc1_b.repeat(E).clone()  # (E*F,)
        elif name.endswith("experts.bias"):
            new_state[name] = fc2_b.clone() if keep_biases else torch.zeros(H)
        elif name.endswith("router.layer.weight"):
            new_state[name] = torch.randn(E, H, generator=gen) * router_std
        else:  # pragma: no cover - guarded by the model's fixed parameter set
            raise RuntimeError(f"upcycle: no rule for {name}")
    moe.load_state_dict(new_state, strict=True, assign=True)
    log.info("upcycled %d dense FFNs into %d experts (top-%d) at layers %s", len(new_cfg.moe_layers), E, top_k,
             new_cfg.moe_layers)
    return moe.train(dense.training)


@torch.no_grad()
def diversify_experts(moe: NomicMoE, *, noise: float = 0.1, router_gain: float = 10.0, bias_std: float = 0.05,
                      seed: int = 0) -> NomicMoE:
    """Make a freshly upcycled MoE's experts distinct and its router decisive (in place; returns ``moe``).

    Upcycled experts are copies and the router is N(0, 0.02), i.e. near-uniform: on such a model an
    engine that routes a token to the wrong expert, or pairs one expert's up-projection with another's
    down-projection, computes the same numbers, so parity tests cannot see it. This is the test and
    benchmark fixture that can: every expert weight times ``1 + noise * N(0, 1)`` (each expert its own
    draw), router logits scaled by ``router_gain`` (sharper softmax: top-k masses far from 1/E) and a
    non-zero shared expert bias N(0, ``bias_std``) (upcycling starts it at zero, so dropping it would be
    invisible too). Not a training recipe.
    """
    gen = torch.Generator().manual_seed(seed)
    for block in moe.encoder.layers:
        mlp = block.mlp
        if not hasattr(mlp, "router"):
            continue
        for p in (mlp.experts.mlp.w1, mlp.experts.mlp.w2):  # (E*F, H): rows of expert e are one block
            p.mul_(1 + noise * torch.randn(p.shape, generator=gen))
        mlp.router.layer.weight.mul_(router_gain)
        mlp.experts.bias.copy_(torch.randn(mlp.experts.bias.shape, generator=gen) * bias_std)
    return moe


@torch.no_grad()
def expert_diversity(moe: NomicMoE, input_ids, attention_mask, *, max_tokens: int = 256) -> list[dict]:
    """Per MoE layer, on real tokens: how distinct the experts are and how decisively the router picks.

    -> [{"layer", "expert_share" (E,) of the top-k picks, "topk_mass_mean" (uniform: K/E),
    "expert_gap_min" / "expert_gap_mean" (||y_i - y_j|| / ||y_i|| between experts' FFN outputs on the
    same tokens; 0 for copies)}]. Used to check that a parity fixture can see a mis-routed expert.
    """
    from moe2edge.kernels import route_ref

    seen: dict[int, torch.Tensor] = {}
    hooks = [b.mlp.register_forward_hook(lambda m, i, o, k=k: seen.update({k: i[0]}))
             for k, b in enumerate(moe.encoder.layers) if hasattr(b.mlp, "router")]
    try:
        ids, mask = torch.as_tensor(input_ids), torch.as_tensor(attention_mask)
        moe(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    real = mask.reshape(-1).bool()
    out = []
    for k, x in sorted(seen.items()):
        mlp = moe.encoder.layers[k].mlp
        h = x.reshape(-1, x.shape[-1])[real]  # (T, H) real tokens
        _, w, e = route_ref(mlp.router.layer(h), mlp.cfg.moe_top_k, mlp.cfg.moe_normalize_expert_weights)
        share = torch.bincount(e.reshape(-1), minlength=mlp.cfg.num_experts).float() / e.numel()
        w1, w2, b1 = mlp.experts.mlp.views()  # (E, F, H), (E, F, H), (E, F) | None
        hs = h[:max_tokens]
        ys = torch.stack([torch.nn.functional.gelu(hs @ w1[i].T + (0 if b1 is None else b1[i])) @ w2[i]
                          for i in range(len(w1))])  # (E, n, H)
        gaps = [float((ys[i] - ys[j]).norm() / ys[i].norm().clamp(min=1e-12))
                for i in range(len(ys)) for j in range(len(ys)) if i != j]
        out.append({"layer": k, "expert_share": [round(float(s), 4) for s in share],
                    "topk_mass_mean": round(float(w.sum(-1).mean()), 4),
                    "expert_gap_min": round(min(gaps), 5), "expert_gap_mean": round(sum(gaps) / len(gaps), 5)})
    return out
