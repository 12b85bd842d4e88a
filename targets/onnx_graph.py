"""ONNX graph utilities shared by the ONNX, OpenVINO and TensorRT targets (onnx + onnxruntime only).

* ``preoptimize``: ONNX Runtime's offline *basic* optimisation (constant folding, redundant-node
  removal; hardware-independent, so the file stays portable). Measured: quantising without it leaves
  ORT 4x slower than fp32 (env-notes).
* ``matmul_nodes``: the MatMul/Gemm nodes with what feeds them (weight initializer or activation),
  used to pick what INT8 may touch: weight MatMuls yes; the router (a flipped top-k choice moves a
  token to another expert: worst token cosine 0.44 measured) and activation x activation MatMuls no.
* ``mask_only_tensors`` / ``check_no_qdq_on_mask``: the additive attention mask is -inf-like; a Q/DQ
  on it gets an infinite scale and destroys the embeddings (ModelOpt defaults: cosine 0.5 measured).
* ``external_data_locations`` / ``copy_onnx`` / ``move_onnx``: a graph over ``EXTERNAL_DATA_BYTES`` (the
  released model's 1.9 GB) keeps its weights in a ``.data`` file beside it, referenced by a relative
  name written inside the graph; renaming the graph alone breaks it ("External data path does not
  exist"), so every copy goes through ``copy_onnx``, which rewrites that name to ``<graph>.data``.
* ``count_matmul_flops``: FLOPs of every MatMul/Gemm with the real shapes of one run (NonZero makes
  the sparse graph's shapes data-dependent, so they are measured, not inferred).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Initializer names written by torch_export.ExportMoE (kept in sync there).
ROUTER_TAG = "mlp.router"
EXPERT_WEIGHT_RE = r"mlp\.fc[12]\.\d+$"


def _external_tensors(model):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def external_data_locations(path: str | Path) -> list[str]:
    """Relative names of the external data files a graph file references (empty: self-contained)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False)
    locs = []
    for t in _external_tensors(g):
        loc = next(e.value for e in t.external_data if e.key == "location")
        if loc not in locs:
            locs.append(loc)
    return locs


def data_file_name(graph_name: str) -> str:
    """The fixed name of a graph's external data file: ``model.onnx`` -> ``model.onnx.data``."""
    return graph_name + ".data"


def copy_onnx(src: str | Path, dst: str | Path) -> list[Path]:
    """Copy a graph file and its external data (if any) to ``dst``; the data lands in ``dst.data`` and the
    graph's references are rewritten to that relative name. Returns the files written (graph first)."""
    import onnx

    src, dst = Path(src), Path(dst)
    g = onnx.load(str(src), load_external_data=False)
    ext = _external_tensors(g)
    if not ext:
        shutil.copyfile(src, dst)
        return [dst]
    locs = {next(e.value for e in t.external_data if e.key == "location") for t in ext}
    missing = [loc for loc in locs if not (src.parent / loc).is_file()]
    if missing:
        raise FileNotFoundError(f"{src}: its external data file {missing[0]} is missing (the graph keeps its "
                                "weights beside it); rebuild the graph")
    new = data_file_name(dst.name)
    if len(locs) == 1:
        for t in ext:
            for e in t.external_data:
                if e.key == "location":
                    e.value = new
        shutil.copyfile(src.parent / locs.pop(), dst.parent / new)
        onnx.save(g, str(dst))
    else:  # several data files: gather them into one (loads the weights once)
        full = onnx.load(str(src))
        onnx.save(full, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=new)
    return [dst, dst.parent / new]


def move_onnx(src: str | Path, dst: str | Path) -> list[Path]:
    """``copy_onnx`` then remove the source graph and its data files."""
    src = Path(src)
    locs = external_data_locations(src)
    out = copy_onnx(src, dst)
    for loc in locs:
        (src.parent / loc).unlink(missing_ok=True)
    src.unlink(missing_ok=True)
    return out


def preoptimize(src: str | Path, dst: str | Path) -> Path:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    if external_data_locations(src):  # large graph: the optimised copy keeps its weights outside too
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    data_file_name(Path(dst).name))
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
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

