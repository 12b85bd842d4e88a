"""Dense student: each MoE layer becomes one dense FFN; optionally fewer layers and a narrower FFN.

    student = densify(teacher, calib, init="merge", layers=[0, 2, 4], intermediate_size=768)

* ``init="merge"``: fc1 / fc2 = the usage-weighted average of the experts (usage = calibration gate
  mass); ``"top"``: the expert with the highest score. fc1 bias = the experts' ``b1`` (same
  average) when present, else 0; fc2 bias = the shared ``experts.bias`` (added once, spec section 1).
  An MoE whose experts are identical with renormalised top-k (gate mass 1) is then EXACTLY this
  dense FFN (tested).
* ``rescale``: the released top-k is not renormalised, so the MoE computes ~gate_mass x FFN; the
  least-squares scalar between the MoE's routed output and the dense FFN's (calibration tokens) is
  folded into fc2.weight.
* ``layers``: which teacher layers to keep (e.g. every other one); ``intermediate_size``: keep the
  F' hidden units of each FFN with the largest mean |activation| x ||fc2 column|| on calibration.
* ``refit`` (narrow FFN only): after choosing the F' units, re-solve fc2 (weight and bias) by ridge
  least squares so the narrow FFN reproduces the teacher layer's full FFN output (the MoE's routed
  output, or the dense FFN's) on the calibration tokens: pruning with reconstruction instead of
  just dropping units. Measured (all six layers, F' = 224, before any fine-tune): see
  docs/benchmarks.md.

Dimension legend: E experts, F FFN size (F' kept), D hidden size, T calibration tokens.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from moe2edge.student.calibration import SCORES, Calibration, least_squares_scale, moe_output
from moe2edge.teacher.model import NomicMoE

log = logging.getLogger(__name__)

INITS = ("merge", "top")


def _check(model: NomicMoE, calib: Calibration, init, score, layers, intermediate_size) -> list[int]:
    cfg = model.config
    if init not in INITS:
        raise ValueError(f"unknown dense init {init!r}; choose one of {', '.join(INITS)}")
    if score not in SCORES:
        raise ValueError(f"unknown expert score {score!r}; choose one of {', '.join(SCORES)}")
    layers = list(range(cfg.num_layers)) if layers is None else [int(i) for i in layers]
    if not layers:
        raise ValueError("layers is empty: a student needs at least one layer")
    bad = [i for i in layers if not 0 <= i < cfg.num_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist in the {cfg.num_layers}-layer teacher")
    if len(set(layers)) != len(layers) or layers != sorted(layers):
        raise ValueError(f"layers must be increasing and unique, got {layers}")
    if intermediate_size is not None and not 1 <= intermediate_size <= cfg.intermediate_size:
        raise ValueError(f"intermediate_size={intermediate_size} must be in [1, {cfg.intermediate_size}] "
                         "(the teacher's FFN size)")
    missing = [i for i in layers if i not in calib.layers
               or (cfg.is_moe_layer(i) and calib.layers[i].counts is None)
               or calib.layers[i].inputs.shape[-1] != cfg.hidden_size]
    if missing:
        raise ValueError(f"calibration does not match this teacher at layers {missing} (recalibrate)")
    return layers


@torch.no_grad()
def densify(model: NomicMoE, calib: Calibration, *, init: str = "merge", score: str = "router",
            layers: list[int] | None = None, intermediate_size: int | None = None,
            rescale: bool = True, refit: bool = False, ridge: float = 1e-3) -> NomicMoE:
    """Return a new dense NomicMoE (no MoE layers) built from ``model``; ``model`` is left untouched."""
    cfg = model.config
    layers = _check(model, calib, init, score, layers, intermediate_size)
    Fd, D = cfg.intermediate_size, cfg.hidden_size
    Fn = intermediate_size or Fd
    new_cfg = cfg.replace(num_layers=len(layers), moe_every_n_layers=0, num_experts=0,
                          moe_normalize_expert_weights=False, moe_expert_fc1_bias=False, intermediate_size=Fn)
    src = model.state_dict()
    state = {k: v.detach().clone() for k, v in src.items() if not k.startswith("encoder.")}
    report = {}
    for j, i in enumerate(layers):
        p, q = f"encoder.layers.{i}.", f"encoder.layers.{j}."
        for name in ("attn.Wqkv", "attn.out_proj", "norm1", "norm2"):
            for kind in ("weight", "bias"):
                state[f"{q}{name}.{kind}"] = src[f"{p}{name}.{kind}"].clone()
        lc = calib.layers[i]
        if cfg.is_moe_layer(i):
            E = cfg.num_experts
            w1 = src[p + "mlp.experts.mlp.w1"].view(E, Fd, D)  # (E, F, D)
            w2 = src[p + "mlp.experts.mlp.w2"].view(E, Fd, D)  # (E, F, D)
            b1 = src.get(p + "mlp.experts.mlp.b1")
            b1 = b1.view(E, Fd) if b1 is not None else torch.zeros(E, Fd)
            if init == "merge":
                u = lc.gate_sum.clamp(min=1e-6)
                u = u / u.sum()  # (E,)
            else:
                u = F.one_hot(lc.score(score).argmax(), E).float()
            fc1_w = (u[:, None, None] * w1).sum(0)  # (F, D)
            fc2_w = (u[:, None, None] * w2).sum(0).t().contiguous()  # (F, D) -> (D, F): nn.Linear layout
            fc1_b = (u[:, None] * b1).sum(0)  # (F,)
            fc2_b = src[p + "mlp.experts.bias"].clone()  # shared expert bias (added once)
            c = 1.0
            if rescale:
                x = lc.inputs
                dense_out = F.gelu(x @ fc1_w.t() + fc1_b) @ fc2_w.t()  # (T, D), no fc2 bias
                c = least_squares_scale(moe_output(model.encoder.layers[i].mlp, x), dense_out)
                fc2_w = fc2_w * c
            report[str(i)] = {"from": "moe", "init": init, "output_scale": round(c, 6)}
        else:
            fc1_w, fc1_b = src[p + "mlp.fc1.weight"], src[p + "mlp.fc1.bias"]
            fc2_w, fc2_b = src[p + "mlp.fc2.weight"], src[p + "mlp.fc2.bias"]
            report[str(i)] = {"from": "dense"}
        if Fn < Fd:  # keep the F' most important hidden units
            hidden = F.gelu(lc.inputs @ fc1_w.t() + fc1_b)  # (T, F)
            imp = hidden.abs().mean(0) * fc2_w.norm(dim=0)  # (F,)
            idx = torch.topk(imp, Fn).indices.sort().values  # (F',)
            if refit:
                if cfg.is_moe_layer(i):  # (T, D): what the teacher layer's FFN outputs
                    full = moe_output(model.encoder.layers[i].mlp, lc.inputs) + fc2_b
                else:
                    full = hidden @ fc2_w.t() + fc2_b
                fc2_w, fc2_b, err = refit_fc2(hidden[:, idx], full, ridge)
                report[str(i)]["refit_rel_error"] = round(err, 5)
            else:
                fc2_w = fc2_w[:, idx]
            fc1_w, fc1_b = fc1_w[idx], fc1_b[idx]
            report[str(i)]["kept_units"] = Fn
        state[q + "mlp.fc1.weight"] = fc1_w.clone()
        state[q + "mlp.fc1.bias"] = fc1_b.clone()
        state[q + "mlp.fc2.weight"] = fc2_w.contiguous().clone()
        state[q + "mlp.fc2.bias"] = fc2_b.clone()
    with torch.device("meta"):
        student = NomicMoE(new_cfg)
    student.load_state_dict(state, strict=True, assign=True)
    student.densify = {"layers": layers, "per_layer": report}
    log.info("densified: layers %s, FFN %d, init=%s, rescale=%s, refit=%s", layers, Fn, init, rescale, refit)
    return student.train(model.training)


@torch.no_grad()
def refit_fc2(h: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ridge least squares [h, 1] @ [W^T; b] ~= y in float64 -> (W (D, F'), b (D,), relative error).

    h: (T, F') kept hidden units on calibration tokens; y: (T, D) the output to reproduce. ``ridge``
    is relative to the mean diagonal of h^T h (scale-free)."""
    x = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1).double()  # (T, F'+1)
    g = x.t() @ x  # (F'+1, F'+1)
    g += ridge * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    sol = torch.linalg.solve(g, x.t() @ y.double())  # (F'+1, D)
    err = float((x @ sol - y.double()).norm() / y.double().norm().clamp(min=1e-12))
    return sol[:-1].t().float().contiguous(), sol[-1].float(), err


def active_non_embedding_parameters(model) -> int:
    """Parameters touched per token outside the embedding tables (word, position, token type)."""
    if not hasattr(model, "num_active_parameters"):
        return 0  # static student: lookup only
    emb = sum(p.numel() for n, p in model.named_parameters() if n.startswith("embeddings."))
    return int(model.num_active_parameters() - emb)
