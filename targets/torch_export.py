"""PyTorch -> ONNX: the graph every target starts from.

``ExportEmbedder`` wraps a ``NomicMoE``-family model so that the graph maps
``(input_ids, attention_mask) -> sentence_embedding`` with masked mean pooling, Matryoshka truncation
and L2 normalisation inside (the model's own ``embed``). Each MoE layer is swapped, in a deep copy,
for ``ExportMoE``: the same math as ``kernels.moe_mlp_ref`` (a fixed loop over experts with
``nonzero`` + ``index_select`` + ``index_put(accumulate=True)``: real sparse routing, measured to
export with dynamic batch and sequence, env-notes), but with each expert's fc1/fc2 held as its own
parameter (pre-transposed). That makes every expert weight an ONNX initializer feeding its MatMul directly, which
per-channel INT8 (ORT, NNCF, TensorRT) needs; the reference's ``w1[e].t()`` exports as a run-time
Gather + Transpose that quantisers treat as an activation.

``all_experts=True`` builds the dense-routing variant (every expert runs on every token, gated by a
weight that is zero where the token was not routed): same output, E/K times the expert FLOPs. It
exists only as the baseline of the sparse-vs-dense comparison.

Dimension legend:
    B batch   S sequence   T tokens (B*S)   H hidden   F expert FFN   E experts   K top-k   D output dim
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe2edge.kernels import route_ref

log = logging.getLogger(__name__)

INPUT_NAMES = ["input_ids", "attention_mask"]
# Graphs whose weights exceed this many bytes keep them in an external ``<graph>.data`` file (protobuf's
# 2 GB limit; the released model is 1.9 GB, torch's own switch is at 1.5 GB). Module-level so a test can
# lower it to exercise the external-data path on a small model.
EXTERNAL_DATA_BYTES = 1 << 30
# Not "embedding": that name can clash with an internal value name (ORT "Duplicate definition").
OUTPUT_NAME = "sentence_embedding"


class ExportMoE(nn.Module):
    """Token-choice top-k MoE FFN with per-expert Linear layers (export form of ``MoEMLP``)."""

    def __init__(self, moe: nn.Module, *, all_experts: bool = False):
        super().__init__()
        cfg = moe.cfg
        self.top_k, self.normalize, self.all_experts = cfg.moe_top_k, cfg.moe_normalize_expert_weights, all_experts
        w1, w2, b1 = moe.experts.mlp.views()  # (E, F, H), (E, F, H), (E, F) | None
        E, Fd, H = w1.shape
        # Weights pre-transposed to (in, out) so each exports as a plain MatMul on a named initializer
        # (nn.Linear on 2-D input becomes Gemm, which ORT's dynamic quantiser does not handle).
        self.router = nn.Parameter(moe.router.layer.weight.detach().t().contiguous())  # (H, E)
        self.fc1 = nn.ParameterList(w1[e].detach().t().contiguous() for e in range(E))  # E x (H, F)
        self.fc2 = nn.ParameterList(w2[e].detach().clone() for e in range(E))  # E x (F, H): applied un-transposed
        self.b1 = None if b1 is None else nn.ParameterList(b1[e].detach().clone() for e in range(E))  # E x (F,)
        self.bias = nn.Parameter(moe.experts.bias.detach().clone())  # ONE shared bias, added once

    def _expert(self, x, e: int):
        a = x @ self.fc1[e]  # (n, F)
        if self.b1 is not None:
            a = a + self.b1[e]
        return F.gelu(a) @ self.fc2[e]  # (n, H); exact erf GELU

    def forward(self, x, mask=None):
        B, S, H = x.shape
        h = x.reshape(B * S, H)  # (T, H)
        _, weights, experts = route_ref(h @ self.router, self.top_k, self.normalize)  # (T, K) fp32, (T, K) int64
        out = torch.zeros_like(h)  # (T, H)
        for e in range(len(self.fc1)):
            hit = experts == e  # (T, K)
            if self.all_experts:  # dense routing: every token through every expert, zero gate if unrouted
                gate = (weights * hit).sum(-1)  # (T,)
                out = out + self._expert(h, e) * gate.to(h.dtype).unsqueeze(-1)
                continue
            tok = torch.nonzero(hit.any(dim=-1)).squeeze(-1)  # (n,) may be empty
            gate = (weights * hit).sum(-1).index_select(0, tok)  # (n,)
            ye = self._expert(h.index_select(0, tok), e)  # (n, H)
            out = out.index_put((tok,), ye * gate.to(ye.dtype).unsqueeze(-1), accumulate=True)
        return (out + self.bias).view(B, S, H), None


class ExportEmbedder(nn.Module):
    """(input_ids, attention_mask) -> (B, D) L2-normalised embeddings, pooling inside the graph."""

    def __init__(self, model: nn.Module, *, dim: int | None = None, all_experts: bool = False):
        super().__init__()
        hidden = model.config.hidden_size
        if dim is not None and not 1 <= dim <= hidden:
            raise ValueError(f"dim must be in [1, {hidden}], got {dim}")
        self.dim = None if dim in (None, hidden) else dim
        self.model = copy.deepcopy(model).eval()
        for block in getattr(getattr(self.model, "encoder", None), "layers", []):  # none in a static student
            if hasattr(block.mlp, "router"):  # an MoE layer
                block.mlp = ExportMoE(block.mlp, all_experts=all_experts)

    def forward(self, input_ids, attention_mask):
        return self.model.embed(input_ids, attention_mask, dim=self.dim).embeddings


def export_onnx(model: nn.Module, sample, path: str | Path, *, dim: int | None = None, all_experts: bool = False,
                opset: int = 20) -> Path:
    """``torch.onnx.export(dynamo=True)`` with dynamic batch and sequence; returns the .onnx path.

    Weights are stored inside the file up to ``EXTERNAL_DATA_BYTES``; above, in ``<path>.data`` beside it
    (referenced by that relative name: move the pair with ``onnx_graph.copy_onnx``).
    """
    path = Path(path)
    wrapper = ExportEmbedder(model, dim=dim, all_experts=all_experts).eval()  # no training-mode export
    ids = torch.as_tensor(np.asarray(sample.input_ids), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(sample.attention_mask), dtype=torch.long)
    if ids.shape[0] < 2 or ids.shape[1] < 2:
        raise ValueError(f"the tracing sample needs batch >= 2 and sequence >= 2 (got {tuple(ids.shape)}): "
                         "size-1 dimensions get specialised")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad():
        prog = torch.onnx.export(
            wrapper, (ids, mask), dynamo=True, opset_version=opset, input_names=INPUT_NAMES,
            output_names=[OUTPUT_NAME], dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                        "attention_mask": {0: batch, 1: seq}},
            optimize=True, verbose=False,
        )
    external = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > EXTERNAL_DATA_BYTES
    del wrapper
    prog.save(str(path), external_data=external)
    log.info("exported %s (%s routing, dim %s%s)", path, "all-experts" if all_experts else "sparse", dim or "full",
             ", weights in external data" if external else "")
    return path


@torch.no_grad()
def reference_embeddings(model: nn.Module, batches, *, dim: int | None = None) -> np.ndarray:
    """PyTorch fp32 embeddings of [(ids, mask), ...] numpy batches, concatenated: the parity reference."""
    out = []
    for ids, mask in batches:
        e = model.embed(torch.as_tensor(ids), torch.as_tensor(mask), dim=dim).embeddings
        out.append(e.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, dim or model.config.hidden_size), np.float32)


@torch.no_grad()
def expert_token_counts(model: nn.Module, batches) -> np.ndarray:
    """(L_moe, E) real tokens routed to each expert over the batches (empty for a dense model)."""
    total = None
    for ids, mask in batches:
        stats = model.embed(torch.as_tensor(ids), torch.as_tensor(mask)).router_stats
        if not stats:
            return np.zeros((0, 0))
        c = torch.stack([s.counts for s in stats]).numpy()
        total = c if total is None else total + c
    return total if total is not None else np.zeros((0, 0))
