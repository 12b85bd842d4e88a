"""Calibration: what each FFN / MoE layer of the teacher sees and does on real text.

One forward pass of the teacher over calibration texts records, per layer, the FFN inputs at the
real (unmasked) tokens; for MoE layers it also records per expert:

* ``counts``   top-k picks                       (routing frequency = counts / T)
* ``prob_sum`` router probability mass           (the aux loss's "meanprob" = prob_sum / T)
* ``gate_sum`` top-k gate weight actually applied (what the experts are multiplied by)
* ``out_norm`` sum of ||gate * expert(h)|| over the picks (output-norm contribution)

Pruning and densifying read their expert scores, merge weights and output rescaling from here.

Dimension legend: T calibration tokens, D hidden size, E experts, K top-k, F FFN size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moe2edge import kernels
from moe2edge._io import texts_sha256
from moe2edge.teacher.model import MoEMLP, NomicMoE

log = logging.getLogger(__name__)

# Expert scores (string-valued enum so CLI strings work).
SCORES = ("router", "output_norm")


@dataclass
class LayerCalibration:
    layer: int
    inputs: torch.Tensor  # (T, D) FFN inputs at real tokens
    counts: torch.Tensor | None = None  # (E,)
    prob_sum: torch.Tensor | None = None  # (E,)
    gate_sum: torch.Tensor | None = None  # (E,)
    out_norm: torch.Tensor | None = None  # (E,)
    gate_mass: float | None = None  # mean over tokens of the summed top-k weights

    @property
    def num_tokens(self) -> int:
        return int(self.inputs.shape[0])

    def score(self, kind: str) -> torch.Tensor:
        """(E,) expert importance. 'router': routing frequency x mean router probability;
        'output_norm': mean norm of the gated expert output (zero for tokens not routed to it)."""
        T = max(self.num_tokens, 1)
        if kind == "router":
            return (self.counts / T) * (self.prob_sum / T)
        if kind == "output_norm":
            return self.out_norm / T
        raise ValueError(f"unknown expert score {kind!r}; choose one of {', '.join(SCORES)}")


@dataclass
class Calibration:
    layers: dict[int, LayerCalibration]
    n_texts: int
    texts_sha256: str
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-able: per MoE layer load, gate mass and both scores (for manifests and reports)."""
        out = {"n_texts": self.n_texts, "texts_sha256": self.texts_sha256, "layers": {}}
        for i, lc in self.layers.items():
            row = {"tokens": lc.num_tokens}
            if lc.counts is not None:
                row.update(load=(lc.counts / lc.counts.sum()).round(decimals=4).tolist(),
                           gate_mass=round(lc.gate_mass, 4),
                           **{f"score_{k}": lc.score(k).round(decimals=5).tolist() for k in SCORES})
            out["layers"][str(i)] = row
        return out


def expert_output(mlp: MoEMLP, e: int, h: torch.Tensor) -> torch.Tensor:
    """One expert's MLP (no gate, no shared bias): (n, D) -> (n, D)."""
    w1, w2, b1 = mlp.experts.mlp.views()  # (E, F, D) x2, (E, F) | None
    a = h @ w1[e].t()  # (n, F)
    if b1 is not None:
        a = a + b1[e]
    return F.gelu(a) @ w2[e]  # w2 stored [F, D], applied un-transposed (spec section 2)


@torch.no_grad()
def moe_output(mlp: MoEMLP, h: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The MoE layer's routed output WITHOUT its shared bias: (T, D) -> (T, D)."""
    outs = []
    for s in range(0, h.shape[0], chunk):
        y, _ = mlp(h[s:s + chunk][None])  # (1, n, D)
        outs.append(y[0] - mlp.experts.bias)
    return torch.cat(outs) if outs else h.new_zeros(h.shape)


@torch.no_grad()
def calibrate(model: NomicMoE, tokenizer, texts: list[str], *, max_tokens: int = 16384,
              batch_size: int = 32) -> Calibration:
    """Run ``model`` over ``texts`` (already prefixed if wanted) and record per-layer FFN statistics.

    Stops adding texts once ``max_tokens`` real tokens have been seen (keeps memory bounded:
    T x D floats per layer).
    """
    if not texts:
        raise ValueError("calibration needs at least one text")
    model.eval()
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(model.config.num_layers)}

    def hook(i):
        def fn(module, args, output):
            x, mask = args[0], args[1]
            captured[i].append(x[mask.bool()].detach().float())  # (n, D) real tokens only
        return fn

    handles = [blk.mlp.register_forward_hook(hook(i)) for i, blk in enumerate(model.encoder.layers)]
    used, seen = 0, 0
    try:
        for s in range(0, len(texts), batch_size):
            ids, mask, _ = tokenizer(texts[s:s + batch_size])
            model(ids, mask)
            used = s + len(ids)
            seen += int(mask.sum())
            if seen >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
    cfg = model.config
    layers = {}
    for i, blk in enumerate(model.encoder.layers):
        x = torch.cat(captured[i])[:max_tokens]  # (T, D)
        lc = LayerCalibration(layer=i, inputs=x)
        if isinstance(blk.mlp, MoEMLP):
            E = cfg.num_experts
            probs, weights, experts = kernels.route_ref(blk.mlp.router.layer(x), cfg.moe_top_k,
                                                        cfg.moe_normalize_expert_weights)  # (T,E) (T,K) (T,K)
            onehot = F.one_hot(experts, E).float()  # (T, K, E)
            lc.counts = onehot.sum((0, 1))
            lc.prob_sum = probs.sum(0)
            lc.gate_sum = (weights[..., None] * onehot).sum((0, 1))
            lc.gate_mass = float(weights.sum(-1).mean())
            out_norm = torch.zeros(E)
            for e in range(E):
                tok, slot = torch.nonzero(experts == e, as_tuple=True)
                if len(tok):
                    y = expert_output(blk.mlp, e, x[tok]) * weights[tok, slot, None]  # (n, D)
                    out_norm[e] = y.norm(dim=-1).sum()
            lc.out_norm = out_norm
        layers[i] = lc
    log.info("calibrated on %d texts, %d tokens", used, layers[0].num_tokens)
    return Calibration(layers=layers, n_texts=used, texts_sha256=texts_sha256(texts[:used]),
                       meta={"max_tokens": max_tokens})


def least_squares_scale(target: torch.Tensor, pred: torch.Tensor) -> float:
    """argmin_c ||target - c * pred||^2 = <target, pred> / <pred, pred>."""
    den = float((pred * pred).sum())
    return float((target * pred).sum()) / den if den > 0 else 1.0
