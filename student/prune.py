"""Pruned-expert student: keep N experts per MoE layer, lower top-k, remap the router rows.

    student = prune_experts(teacher, calib, num_experts=4, top_k=1, score="router", merge=True)

Steps, per MoE layer:
1. score the experts on calibration text (``calibration.SCORES``: routing frequency x router
   probability mass, or the mean norm of the gated expert output) and keep the N best, in their
   original order (so keeping all of them is the identity, tested);
2. router rows of the kept experts only (softmax over the kept logits = the teacher's softmax
   restricted to them and renormalised);
3. optionally merge each dropped expert into the kept expert that takes over most of its tokens
   (usage-weighted average of w1 / w2 / b1, usage = calibration gate mass) instead of discarding it;
4. gate mass: the released top-k weights are NOT renormalised (spec section 1), so top-2 -> top-1
   changes the scale of every MoE output (~0.7 -> ~0.5 on the released model, ~2/E -> ~1/E on a fresh
   upcycle). ``normalize`` sets ``moe_normalize_expert_weights`` (gate mass 1); ``rescale`` folds the
   least-squares scalar that best maps the student's routed output onto the teacher's (on the
   calibration tokens) into w2. Both are measured in docs/benchmarks.md.

Dimension legend: E experts (teacher), N kept, K top-k, F FFN size, D hidden size.
"""

from __future__ import annotations

import logging

import torch

from moe2edge.student.calibration import SCORES, Calibration, least_squares_scale, moe_output
from moe2edge.teacher.model import NomicMoE

log = logging.getLogger(__name__)


def _check_moe(model: NomicMoE, calib: Calibration) -> None:
    cfg = model.config
    if not cfg.moe_layers:
        raise ValueError("the teacher has no MoE layers: nothing to prune (use the dense student instead)")
    missing = [i for i in cfg.moe_layers if calib.layers.get(i) is None or calib.layers[i].counts is None]
    if missing:
        raise ValueError(f"calibration has no routing statistics for MoE layers {missing}: "
                         "it was made with another model (recalibrate with this teacher)")


def merge_plan(lc, keep: list[int], router_w: torch.Tensor) -> dict[int, list[int]]:
    """kept expert -> dropped experts merged into it: the kept expert that wins the most of the
    dropped expert's calibration tokens under the pruned router (ties: highest router logit)."""
    E = router_w.shape[0]
    dropped = [e for e in range(E) if e not in keep]
    plan = {k: [] for k in keep}
    if not dropped:
        return plan
    logits = lc.inputs @ router_w.t()  # (T, E)
    top1 = logits.argmax(-1)  # (T,)
    winner = torch.tensor(keep)[logits[:, keep].argmax(-1)]  # (T,) kept expert that takes each token over
    for d in dropped:
        won = winner[top1 == d]
        if len(won):
            target = int(torch.bincount(won, minlength=E).argmax())
        else:  # never top-1 on the calibration text: the kept expert with the most similar router row
            sims = torch.nn.functional.cosine_similarity(router_w[d][None], router_w[keep], dim=-1)
            target = keep[int(sims.argmax())]
        plan[target].append(d)
    return plan


@torch.no_grad()
def prune_experts(model: NomicMoE, calib: Calibration, *, num_experts: int, top_k: int | None = None,
                  score: str = "router", merge: bool = False, normalize: bool | None = None,
                  rescale: bool = True) -> NomicMoE:
    """Return a new NomicMoE with ``num_experts`` experts per MoE layer and top-``top_k`` routing.

    ``top_k`` defaults to min(teacher's top-k, num_experts); ``normalize`` None keeps the teacher's
    setting. ``model`` is left untouched.
    """
    cfg = model.config
    _check_moe(model, calib)
    if score not in SCORES:
        raise ValueError(f"unknown expert score {score!r}; choose one of {', '.join(SCORES)}")
    if not 1 <= num_experts <= cfg.num_experts:
        raise ValueError(f"num_experts={num_experts} must be in [1, {cfg.num_experts}] "
                         f"(the teacher has {cfg.num_experts} experts per MoE layer)")
    top_k = min(cfg.moe_top_k, num_experts) if top_k is None else top_k
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}] (cannot pick more experts "
                         "than are kept)")
    normalize = cfg.moe_normalize_expert_weights if normalize is None else bool(normalize)
    new_cfg = cfg.replace(num_experts=num_experts, moe_top_k=top_k, moe_normalize_expert_weights=normalize)
    unchanged = (num_experts, top_k, normalize) == (cfg.num_experts, cfg.moe_top_k, cfg.moe_normalize_expert_weights)

    src = model.state_dict()
    state = {k: v.detach().clone() for k, v in src.items() if ".mlp.router." not in k and ".mlp.experts." not in k}
    kept, scales = {}, {}
    Fd, D = cfg.intermediate_size, cfg.hidden_size
    for i in cfg.moe_layers:
        lc, p = calib.layers[i], f"encoder.layers.{i}.mlp."
        s = lc.score(score)  # (E,)
        keep = sorted(torch.topk(s, num_experts).indices.tolist())  # original order: identity when N = E
        router_w = src[p + "router.layer.weight"]  # (E, D)
        w1 = src[p + "experts.mlp.w1"].view(cfg.num_experts, Fd, D)  # (E, F, D)
        w2 = src[p + "experts.mlp.w2"].view(cfg.num_experts, Fd, D)  # (E, F, D)
        b1 = src.get(p + "experts.mlp.b1")
        b1 = b1.view(cfg.num_experts, Fd) if b1 is not None else None  # (E, F)
        if merge:
            plan = merge_plan(lc, keep, router_w)
            usage = lc.gate_sum.clamp(min=1e-6)  # (E,) gate mass each expert carried
            group = [[k, *plan[k]] for k in keep]

            def avg(w, g):
                u = usage[g] / usage[g].sum()  # (n,)
                return (u.view(-1, *([1] * (w.dim() - 1))) * w[g]).sum(0)

            nw1 = torch.stack([avg(w1, g) for g in group])  # (N, F, D)
            nw2 = torch.stack([avg(w2, g) for g in group])
            nb1 = torch.stack([avg(b1, g) for g in group]) if b1 is not None else None
        else:
            nw1, nw2 = w1[keep].clone(), w2[keep].clone()  # (N, F, D)
            nb1 = b1[keep].clone() if b1 is not None else None
        state[p + "router.layer.weight"] = router_w[keep].clone()  # (N, D)
        state[p + "experts.mlp.w1"] = nw1.reshape(num_experts * Fd, D)
        state[p + "experts.mlp.w2"] = nw2.reshape(num_experts * Fd, D)
        if nb1 is not None:
            state[p + "experts.mlp.b1"] = nb1.reshape(num_experts * Fd)
        state[p + "experts.bias"] = src[p + "experts.bias"].clone()
        kept[i] = keep
    with torch.device("meta"):
        student = NomicMoE(new_cfg)
    student.load_state_dict(state, strict=True, assign=True)
    student.eval()
    if rescale and not unchanged:
        for i in cfg.moe_layers:
            x = calib.layers[i].inputs
            c = least_squares_scale(moe_output(model.encoder.layers[i].mlp, x),
                                    moe_output(student.encoder.layers[i].mlp, x))
            student.encoder.layers[i].mlp.experts.mlp.w2.mul_(c)  # routed output scales linearly in w2
            scales[i] = c
    student.pruning = {"kept_experts": {str(i): k for i, k in kept.items()},
                       "output_scale": {str(i): round(c, 6) for i, c in scales.items()}}
    log.info("pruned to %d experts top-%d (score=%s, merge=%s, normalize=%s, rescale=%s): kept %s, scales %s",
             num_experts, top_k, score, merge, normalize, rescale, kept, scales)
    return student.train(model.training)
