"""One e5 MoE teacher layer, 1 thread: PyTorch fp32 vs the standard-op sparse graph (ExportMoE) vs ORT's
native com.microsoft.MoE (fp32, tanh GELU) vs QMoE (int8 experts); interleaved rounds, median ms.

    .venv/bin/python bench/ort_moe_layer.py [CHECKPOINT]   (default /work/shared-runs/e5-moe/final)
"""
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
import torch

from moe2edge.targets import ort_moe
from moe2edge.targets.torch_export import ExportMoE
from moe2edge.teacher.checkpoint import load_pretrained

torch.set_num_threads(1)
ckpt = sys.argv[1] if len(sys.argv) > 1 else "/work/shared-runs/e5-moe/final"
model = load_pretrained(ckpt).eval()
moe = next(b.mlp for b in model.encoder.layers if hasattr(b.mlp, "router"))
t = ort_moe.layer_tensors(moe)
H = t["router_w"].shape[0]


def sess(m):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(m if isinstance(m, str) else m.SerializeToString(), so, providers=["CPUExecutionProvider"])


std = ExportMoE(moe).eval()
x0 = torch.randn(1, 16, H)
with torch.no_grad():
    torch.onnx.export(std, (x0,), "/tmp/ortmoe_std_layer.onnx", dynamo=True, input_names=["x"], output_names=["y"],
                      dynamic_shapes={"x": {1: torch.export.Dim("tokens")}}, opset_version=20)
engines = {"std-op sparse fp32": sess("/tmp/ortmoe_std_layer.onnx"), "native MoE fp32": sess(ort_moe.layer_graph(t)),
           "native QMoE int8": sess(ort_moe.layer_graph(t, quantized=True))}
rng = np.random.default_rng(0)
for T in (128, 32 * 128):
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(5)]
    times = {k: [] for k in ["pytorch fp32", *engines]}
    err = {}
    for r in range(7 if T == 128 else 3):
        x = xs[r % len(xs)]
        with torch.no_grad():
            t0 = time.perf_counter(); ref = moe(torch.as_tensor(x)[None])[0][0].numpy(); times["pytorch fp32"].append(time.perf_counter() - t0)
        for k, s in engines.items():
            feed = {"x": x[None]} if k.startswith("std") else {"x": x}
            t0 = time.perf_counter(); y = s.run(None, feed)[0].reshape(T, H); times[k].append(time.perf_counter() - t0)
            err[k] = float(np.abs(y - ref).max() / np.abs(ref).max())
    base = statistics.median(times["pytorch fp32"])
    for k, v in times.items():
        m = statistics.median(v)
        print(f"T={T:5d} {k:20s} {1000 * m:8.2f} ms  x{base / m:5.2f} vs PyTorch  rel-max-err {err.get(k, 0):.1e}")
