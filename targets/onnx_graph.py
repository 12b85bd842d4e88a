"""ONNX graph utilities shared by the ONNX, OpenVINO and TensorRT targets (onnx + onnxruntime only).

* ``preoptimize``: ONNX Runtime's offline *basic* optimisation (constant folding, redundant-node
  removal; hardware-independent, so the file stays portable). Measured: quantising without it leaves
  ORT 4x slower than fp32 (env-notes).
* ``matmul_nodes``: the MatMul/Gemm nodes with what feeds them (weight initializer or activation),
  used to pick what INT8 may touch: weight MatMuls yes; the router (a flipped top-k choice moves a
  token to another expert: worst token cosine 0.44 measured) and activation x activation MatMuls no.
* ``mask_only_tensors`` / ``check_no_qdq_on_mask``: the additive attention mask is -inf-like; a Q/DQ
  on it gets an infinite scale and destroys the embeddings (ModelOpt defaults: cosine 0.5 measured).
* ``count_matmul_flops``: FLOPs of every MatMul/Gemm with the real shapes of one run (NonZero makes
  the sparse graph's shapes data-dependent, so they are measured, not inferred).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Initializer names written by torch_export.ExportMoE (kept in sync there).
ROUTER_TAG = "mlp.router"
EXPERT_WEIGHT_RE = r"mlp\.fc[12]\.\d+$"


def preoptimize(src: str | Path, dst: str | Path) -> Path:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return Path(dst)


def _graph_maps(graph):
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    return inits, producer


def _is_weight(name: str, inits: set, producer: dict, depth: int = 3) -> bool:
    """An initializer, or a Transpose/Cast/DequantizeLinear of one (constant data, not an activation)."""
    if name in inits:
        return True
    n = producer.get(name)
    if n is None or depth == 0:
        return False
    if n.op_type == "Constant":
        return True
    if n.op_type in ("Transpose", "Cast", "DequantizeLinear", "Identity", "Reshape"):
        return _is_weight(n.input[0], inits, producer, depth - 1)
    return False


def matmul_nodes(model) -> list[dict]:
    """[{name, op, weight: initializer name | None, router: bool}] for every MatMul/Gemm."""
    inits, producer = _graph_maps(model.graph)
    rows = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        w = next((i for i in n.input[1:2] if _is_weight(i, inits, producer)), None)
        rows.append({"name": n.name, "op": n.op_type, "weight": w,
                     "router": bool(w) and ROUTER_TAG in w})
    return rows


def router_matmuls(model) -> list[str]:
    """Router MatMul/Gemm nodes: their weight has E rows/cols and feeds a Softmax/TopK (names first)."""
    named = [r["name"] for r in matmul_nodes(model) if r["router"]]
    if named:
        return named
    # Fallback when initializer names were lost: MatMuls whose output reaches a TopK within 3 nodes.
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        frontier, hit = list(n.output), False
        for _ in range(3):
            nxt = [c for t in frontier for c in consumers.get(t, [])]
            if any(c.op_type == "TopK" for c in nxt):
                hit = True
                break
            frontier = [o for c in nxt for o in c.output]
        if hit:
            out.append(n.name)
    return out


def mask_only_tensors(model, mask_input: str = "attention_mask", other_inputs=("input_ids",)) -> set[str]:
    """Tensors computed from the attention mask (and constants) but not from the token ids: the
    additive-mask path. A Q/DQ must never sit on one of these."""
    from_mask, from_ids = {mask_input}, set(other_inputs)
    for n in model.graph.node:  # ONNX nodes are topologically sorted
        ins = set(n.input)
        if ins & from_ids:
            from_ids.update(n.output)
        elif ins & from_mask:
            from_mask.update(n.output)
    return from_mask - from_ids


def check_no_qdq_on_mask(model) -> None:
    bad = [n.name for n in model.graph.node
           if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] in mask_only_tensors(model)]
    if bad:
        raise RuntimeError(f"Q/DQ on the attention-mask path ({', '.join(bad[:5])}): the additive mask would be "
                           "quantised with an infinite scale")


def qdq_summary(model) -> dict:
    ops = Counter(n.op_type for n in model.graph.node)
    return {"QuantizeLinear": ops.get("QuantizeLinear", 0), "DequantizeLinear": ops.get("DequantizeLinear", 0),
            "MatMulInteger": ops.get("MatMulInteger", 0), "DynamicQuantizeLinear": ops.get("DynamicQuantizeLinear", 0)}


def count_matmul_flops(path: str | Path, feeds: dict[str, np.ndarray]) -> dict:
    """Multiply-add FLOPs (2*M*K*N) of every MatMul/Gemm for one run on ``feeds``, from real shapes.

    Every MatMul/Gemm input A and output is exposed as a graph output in a temporary copy, the copy
    is run once in ORT, and the shapes are read back. Returns {"total", "experts", "other", "by_node"}.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    existing = {o.name for o in model.graph.output}
    want = []
    for n in nodes:
        for t in (n.input[0], n.output[0]):
            if t not in existing and t not in want:
                want.append(t)
    for t in want:
        model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))  # MatMul data: float
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the nodes we named
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    shapes = {k: v.shape for k, v in zip(names, sess.run(names, feeds))}
    by_node, experts = {}, 0
    for n in nodes:
        a, y = shapes[n.input[0]], shapes[n.output[0]]
        k = a[0] if (n.op_type == "Gemm" and any(at.name == "transA" and at.i for at in n.attribute)) else a[-1]
        f = 2 * int(np.prod(y)) * int(k)
        by_node[n.name] = f
        if n.input[1:2] and re.search(EXPERT_WEIGHT_RE, n.input[1]):
            experts += f
    total = sum(by_node.values())
    return {"total": total, "experts": experts, "other": total - experts, "by_node": by_node}

