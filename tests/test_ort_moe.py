"""ONNX Runtime's native MoE / QMoE contrib ops on one teacher MoE layer (targets/ort_moe.py).

Documents what decides adoption on ORT 1.32's CPU EP: the kernels exist; their GELU is the tanh form
(so the fp32 gate's max-abs 1e-5 cannot hold against the exact-erf model); QMoE renormalises the top-k
unless ``router_weights`` is given. Real hidden states: the small upcycled MiniLM MoE fixture of
tests/test_targets.py on real package descriptions.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from moe2edge.targets import ort_moe  # noqa: E402
from tests.test_targets import FIXTURE_STATUS, _small_moe  # noqa: E402


def rel(a, b) -> float:
    """max |a - b| relative to max |b| (the fixture's layer outputs reach ~1e2)."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """(MoEMLP module, its real input hidden states (T, H), the model's own layer output (T, H))."""
    from moe2edge.data.installed import read_descriptions
    from moe2edge.targets.runtime import Tokenizer

    model, ckpt = _small_moe(tmp_path_factory, distinct=True)
    tok = Tokenizer(ckpt / "tokenizer.json", max_length=64, pad_id=0)
    moe = next(b.mlp for b in model.encoder.layers if hasattr(b.mlp, "router"))
    seen = {}

    def hook(mod, args, out):
        seen["x"], seen["y"] = args[0].detach(), out[0].detach()

    texts = [t for d in read_descriptions(FIXTURE_STATUS)[:24] for t in (d.short, d.long)]
    ids, mask, _ = tok(texts)
    h = moe.register_forward_hook(hook)
    with torch.no_grad():
        model.embed(torch.as_tensor(ids), torch.as_tensor(mask))
    h.remove()
    H = seen["x"].shape[-1]
    real = torch.as_tensor(mask).reshape(-1).bool()
    return moe, seen["x"].reshape(-1, H)[real], seen["y"].reshape(-1, H)[real]


def test_cpu_kernel_exists_and_gelu_is_tanh(layer):
    moe, x, y_model = layer
    t = ort_moe.layer_tensors(moe)
    got = torch.as_tensor(ort_moe.run_layer(ort_moe.layer_graph(t), x.numpy()))  # runs on CPUExecutionProvider
    with torch.no_grad():
        tanh_ref = ort_moe.ort_moe_ref(x, t, gelu="tanh")
        erf_ref = ort_moe.ort_moe_ref(x, t, gelu="none")
    print(f"rel: erf twin vs model {rel(erf_ref, y_model):.2e}, native vs tanh twin {rel(got, tanh_ref):.2e}, "
          f"native vs model {rel(got, y_model):.2e}")
    assert rel(erf_ref, y_model) < 1e-5  # the twin with erf IS the model layer
    assert rel(got, tanh_ref) < 1e-5  # the native op == the tanh twin ...
    gap = rel(got, y_model)
    assert gap > 5 * rel(got, tanh_ref) and gap > 1e-5, gap  # ... and NOT the erf model
    print(f"native MoE vs model layer: rel max-abs {gap:.2e}; vs tanh twin {rel(got, tanh_ref):.2e}")


def test_swapped_experts_in_fc1_are_seen(layer):
    moe, x, y_model = layer
    t = ort_moe.layer_tensors(moe)
    t["fc1"] = t["fc1"][[1, 0, 2, 3]].copy()  # experts 0 and 1 swapped in the fc1 tensor only
    got = torch.as_tensor(ort_moe.run_layer(ort_moe.layer_graph(t), x.numpy()))
    cos = torch.nn.functional.cosine_similarity(got, y_model, dim=-1)
    assert cos.min() < 0.99, cos.min()  # a layout error fails even the INT8 cosine gate, unlike the GELU gap


@pytest.mark.parametrize("normalize", [True, False])
def test_qmoe_int8_matches_dequantised_reference(layer, normalize):
    moe, x, y_model = layer
    t = ort_moe.layer_tensors(moe)
    t["normalize"] = normalize  # False: the released model's routing -> router_weights carries the full softmax
    _, _, d1 = ort_moe.quantize_rows_int8(t["fc1"])
    _, _, d2 = ort_moe.quantize_rows_int8(t["fc2"])
    got = torch.as_tensor(ort_moe.run_layer(ort_moe.layer_graph(t, quantized=True), x.numpy()))
    with torch.no_grad():
        ref = ort_moe.ort_moe_ref(x, t, fc1=d1, fc2=d2)
        fp = ort_moe.ort_moe_ref(x, t, gelu="none")
    assert rel(got, ref) < 1e-5
    sqnr = 20 * torch.log10(fp.norm() / (got - fp).norm())
    assert sqnr > 30, sqnr  # int8 experts + tanh GELU vs the exact fp32 layer


def test_qmoe_without_router_weights_renormalises(layer):
    """Why router_weights is passed: without it CPU QMoE mixes with softmax over the k chosen logits."""
    moe, x, _ = layer
    t = ort_moe.layer_tensors(moe)
    t["normalize"] = False
    g = ort_moe.layer_graph(t, quantized=True)
    node = next(n for n in g.graph.node if n.op_type == "QMoE")
    assert node.input[14] == "probs"
    del node.input[7:]  # drop router_weights
    _, _, d1 = ort_moe.quantize_rows_int8(t["fc1"])
    _, _, d2 = ort_moe.quantize_rows_int8(t["fc2"])
    got = torch.as_tensor(ort_moe.run_layer(g, x.numpy()))
    with torch.no_grad():
        unnorm = ort_moe.ort_moe_ref(x, t, fc1=d1, fc2=d2)
        renorm = ort_moe.ort_moe_ref(x, {**t, "normalize": True}, fc1=d1, fc2=d2)
    assert rel(got, renorm) < 1e-5 and rel(got, unnorm) > 1e-2


def test_gelu_gap_is_above_the_fp32_gate():
    assert 1e-4 < ort_moe.gelu_gap() < 1e-3  # per activation; the fp32 gate allows 1e-5 on the embeddings
