"""ONNX Runtime's native MoE contrib ops (``com.microsoft.MoE`` fp32, ``com.microsoft.QMoE`` int8 experts)
for one teacher MoE layer: graph builder, its PyTorch twin, and the findings that decide adoption.

Findings on onnxruntime 1.32.0, CPU EP (measured here, tests/test_ort_moe.py):

* Both ops HAVE CPU kernels in 1.32 (older releases were CUDA-only): a one-node graph runs on
  ``CPUExecutionProvider``.
* Their ``activation_type="gelu"`` is the TANH approximation on CPU
  (``onnxruntime/contrib_ops/cpu/moe/moe_utils.cc``: ``0.5x(1 + tanh(0.7978845608 (x + 0.044715 x^3)))``);
  the teacher uses exact erf GELU (teacher/model.py, spec). There is no erf option. The layer output
  differs from the model by ~1e-4..1e-3 (measured), far above the fp32 gate's max-abs 1e-5 on the
  embeddings (targets/gates.py), so an fp32 engine built on ``MoE`` cannot pass verification as the
  gate stands: the standard-op sparse graph (targets/torch_export.ExportMoE) stays the fp32 path.
* ``MoE`` (fp32) routes like the model: softmax over ALL experts, top-k, weights renormalised only
  with ``normalize_routing_weights=1``.
* ``QMoE`` on CPU takes the softmax over the k SELECTED logits (i.e. always renormalised), whatever
  ``normalize_routing_weights`` says; the released model does not renormalise. Passing the full
  softmax as the optional ``router_weights`` input (index 14) restores the model's weights: top-k
  still selects on ``router_probs``, the mixing weights are gathered from ``router_weights``.
* ``QMoE`` int8 without ``block_size`` (one scale per output channel, uint8 storage with the implicit
  offset 128) dequantises to fp32 and runs SGEMM: it matches the dequantised reference to ~5e-6.
  With ``block_size`` 8-bit experts use int8 activations (0.12 abs error on a toy layer, measured).

Layouts (op schema, contrib_defs): fc1 (E, F, H) -- the model's w1 as stored; fc2 (E, H, F) -- the
model's w2 is (E, F, H) applied un-transposed (spec trap), so fc2 = w2.transpose(1, 2). The model's
ONE shared output bias is added after the weighted sum (an fc2 bias inside the op would be scaled by
the routing weights, which do not sum to 1 without renormalisation).

Dimension legend:
    T tokens   H hidden   F expert FFN   E experts   K top-k
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MS_DOMAIN = "com.microsoft"
ORT_GELU = "tanh"  # what activation_type="gelu" computes in ORT 1.32's CPU kernel (moe_utils.cc)


def layer_tensors(moe) -> dict:
    """The op inputs of one ``MoEMLP`` as float32 numpy arrays in the ORT layout."""
    w1, w2, b1 = moe.experts.mlp.views()  # (E, F, H), (E, F, H), (E, F) | None
    lin = moe.router.layer
    out = {
        "router_w": lin.weight.detach().t().contiguous().numpy().astype(np.float32),  # (H, E)
        "fc1": w1.detach().numpy().astype(np.float32).copy(),  # (E, F, H)
        "fc2": w2.detach().transpose(1, 2).contiguous().numpy().astype(np.float32),  # (E, H, F)
        "bias": moe.experts.bias.detach().numpy().astype(np.float32),  # (H,) shared, added once
        "k": int(moe.cfg.moe_top_k), "normalize": bool(moe.cfg.moe_normalize_expert_weights),
    }
    if getattr(lin, "bias", None) is not None:
        out["router_b"] = lin.bias.detach().numpy().astype(np.float32)
    if b1 is not None:
        out["fc1_bias"] = b1.detach().numpy().astype(np.float32)  # (E, F)
    return out


def quantize_rows_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric int8, one scale per output row: (uint8 storage = q + 128, scales (E, N), dequantised).

    QMoE's implicit 8-bit zero point is 128 (op schema: default 2^(bits-1))."""
    s = np.maximum(np.abs(w).max(-1), 1e-12) / 127.0  # (E, N)
    q = np.clip(np.rint(w / s[..., None]), -127, 127).astype(np.int32)
    return (q + 128).astype(np.uint8), s.astype(np.float32), (q * s[..., None]).astype(np.float32)


def layer_graph(t: dict, *, quantized: bool = False):
    """An ONNX model ``x (T, H) -> y (T, H)`` for one layer: router MatMul, native MoE / QMoE, shared bias."""
    from onnx import TensorProto, helper, numpy_helper

    H, E = t["router_w"].shape
    inits = [numpy_helper.from_array(t["router_w"], "router_w"), numpy_helper.from_array(t["bias"], "bias")]
    nodes = [helper.make_node("MatMul", ["x", "router_w"], ["logits0"])]
    if "router_b" in t:
        inits.append(numpy_helper.from_array(t["router_b"], "router_b"))
        nodes.append(helper.make_node("Add", ["logits0", "router_b"], ["logits"]))
    else:
        nodes.append(helper.make_node("Identity", ["logits0"], ["logits"]))
    b1 = "fc1_bias" if "fc1_bias" in t else ""
    if b1:
        inits.append(numpy_helper.from_array(t["fc1_bias"], "fc1_bias"))
    attrs = dict(k=t["k"], activation_type="gelu", normalize_routing_weights=int(t["normalize"]))
    if not quantized:
        inits += [numpy_helper.from_array(t["fc1"], "fc1"), numpy_helper.from_array(t["fc2"], "fc2")]
        nodes.append(helper.make_node("MoE", ["x", "logits", "fc1", b1, "fc2"], ["y0"], domain=MS_DOMAIN, **attrs))
    else:
        q1, s1, _ = quantize_rows_int8(t["fc1"])
        q2, s2, _ = quantize_rows_int8(t["fc2"])
        inits += [numpy_helper.from_array(a, n) for a, n in ((q1, "fc1_q"), (s1, "fc1_s"), (q2, "fc2_q"), (s2, "fc2_s"))]
        ins = ["x", "logits", "fc1_q", "fc1_s", b1, "fc2_q", "fc2_s"]
        if not t["normalize"]:  # CPU QMoE renormalises over the top-k; the full softmax mixes like the model
            nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
            ins += [""] * 7 + ["probs"]  # router_weights is input 14
        nodes.append(helper.make_node("QMoE", ins, ["y0"], domain=MS_DOMAIN, expert_weight_bits=8, **attrs))
    nodes.append(helper.make_node("Add", ["y0", "bias"], ["y"]))
    g = helper.make_graph(nodes, "ort_moe_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(MS_DOMAIN, 1)])


def run_layer(model, x: np.ndarray) -> np.ndarray:
    """Run a ``layer_graph`` on CPU (1 thread): (T, H) -> (T, H)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.ascontiguousarray(x, np.float32)})[0]


def ort_moe_ref(x: torch.Tensor, t: dict, *, gelu: str = ORT_GELU, fc1=None, fc2=None) -> torch.Tensor:
    """The native op's math in PyTorch (fp32): softmax over all experts, top-k, optional renormalisation,
    per-expert fc1 -> GELU (``tanh``: ORT's CPU form; ``none``: the model's exact erf) -> fc2, weighted sum,
    shared bias. ``fc1``/``fc2`` override the layer's (e.g. dequantised int8) weights. x: (T, H)."""
    x = x.float()
    w1 = torch.as_tensor(t["fc1"] if fc1 is None else fc1)  # (E, F, H)
    w2 = torch.as_tensor(t["fc2"] if fc2 is None else fc2)  # (E, H, F)
    logits = x @ torch.as_tensor(t["router_w"])  # (T, E)
    if "router_b" in t:
        logits = logits + torch.as_tensor(t["router_b"])
    probs = torch.softmax(logits, -1)
    wts, idx = torch.topk(probs, t["k"], -1)  # (T, K)
    if t["normalize"]:
        wts = wts / wts.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for j in range(t["k"]):
        e = idx[:, j]  # (T,)
        a = torch.einsum("tfh,th->tf", w1[e], x)  # (T, F)
        if "fc1_bias" in t:
            a = a + torch.as_tensor(t["fc1_bias"])[e]
        a = F.gelu(a, approximate=gelu)
        out = out + wts[:, j : j + 1] * torch.einsum("thf,tf->th", w2[e], a)  # (T, H)
    return out + torch.as_tensor(t["bias"])


def gelu_gap() -> float:
    """max |GELU_erf(x) - GELU_tanh(x)| over x in [-6, 6] (the per-activation error the native op adds)."""
    x = torch.linspace(-6, 6, 120001, dtype=torch.float64)
    return float((F.gelu(x) - F.gelu(x, approximate="tanh")).abs().max())

