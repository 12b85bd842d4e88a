"""OpenVINO target: IR from the exported ONNX (``ov.convert_model("model.onnx")``), INT8 with NNCF.

``ov.convert_model(nn.Module)`` fails on transformers-5 models and ``index_add`` fails through
``torch.export`` (env-notes); the ONNX route works for our graph and keeps one export for every target.

INT8: ``nncf.quantize`` post-training, ``model_type=TRANSFORMER`` (transformer-aware patterns, e.g. no
FakeQuantize on the softmax inputs), real calibration text, and an ``IgnoredScope`` over
(a) the MoE router MatMuls (a flipped top-k moves a token to another expert: worst token cosine 0.44
measured) and (b) the pooling / normalisation tail after the last LayerNorm (NNCF's default model
type quantised it: output norm 2.1 measured). Calibration must route tokens to every expert (checked
before we get here, in ``build.compile_engine``).

Precision at run time is explicit: ``INFERENCE_PRECISION_HINT`` is recorded in engine.json (default
f32, the setting parity is verified with). The CPU plugin's own default on this AVX-512-BF16 machine
is bf16 (~2x faster, ~1e-3 cosine lower); compile with ``--ov-precision bf16`` to ship that.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from moe2edge._optional import has, require
from moe2edge.targets.base import Artifact, CompileConfig, Sample

log = logging.getLogger(__name__)


def ignored_ops(ov_model) -> dict[str, list[str]]:
    """Friendly names of the router MatMuls and of the pooling/normalise tail (NNCF IgnoredScope)."""
    ops = list(ov_model.get_ordered_ops())
    router = []
    for op in ops:
        if op.get_type_name() != "MatMul":
            continue
        consumers = {t.get_node().get_type_name() for out in op.outputs() for t in out.get_target_inputs()}
        weight = op.input_value(1).get_node().get_type_name() in ("Constant", "Convert")
        if weight and "Softmax" in consumers:  # router logits -> softmax(fp32) -> top-k
            router.append(op.get_friendly_name())
    # The tail: everything after the last MVN (LayerNorm's core) except parameters/results.
    last_mvn = max((i for i, op in enumerate(ops) if op.get_type_name() == "MVN"), default=None)
    tail = [] if last_mvn is None else [
        op.get_friendly_name() for op in ops[last_mvn + 1 :]
        if op.get_type_name() not in ("Result", "Parameter", "Constant")
    ]
    return {"router": router, "tail": tail}


class OpenVinoTarget:
    name = "openvino"
    runtime = "openvino"
    runtime_extra = "openvino"
    model_file = "openvino_model.xml"

    def is_available(self) -> bool:
        return has("openvino") and has("onnx") and has("onnxscript")

    def require(self) -> None:
        for mod in ("openvino", "onnx", "onnxscript"):
            require(mod, extra=self.runtime_extra, purpose=f"--target {self.name}")

    def export(self, model, sample: Sample, out_dir: Path, cfg: CompileConfig) -> Artifact:
        import openvino as ov

        from moe2edge.targets.torch_export import export_onnx

        self.require()
        onnx_path = export_onnx(model, sample, Path(out_dir) / "model.fp32.onnx", dim=cfg.dim,
                                all_experts=cfg.all_experts, opset=cfg.opset)
        ov_model = ov.convert_model(str(onnx_path))
        xml = Path(out_dir) / "fp32" / self.model_file
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)  # keep fp32 weights: parity at 1e-4
        return Artifact(xml, "openvino", "fp32", {"converter": "openvino.convert_model(model.onnx)",
                                                  "routing": "all-experts" if cfg.all_experts else "sparse",
                                                  "onnx": str(onnx_path)})

    def quantize(self, exported: Artifact, calibration, cfg: CompileConfig, *, probe=None) -> Artifact:
        import nncf
        import openvino as ov

        require("nncf", extra="openvino", purpose="OpenVINO INT8")
        ov_model = ov.Core().read_model(str(exported.path))
        ign = ignored_ops(ov_model)
        names = ign["router"] + ign["tail"]
        feeds = [{"input_ids": np.asarray(i, np.int64), "attention_mask": np.asarray(m, np.int64)}
                 for i, m in calibration]
        q = nncf.quantize(
            ov_model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds),
            ignored_scope=nncf.IgnoredScope(names=names, validate=False),
        )
        xml = exported.path.parent.parent / "int8" / self.model_file
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(q, str(xml), compress_to_fp16=False)
        fq = sum(1 for op in q.get_ops() if op.get_type_name() == "FakeQuantize")
        settings = {"method": "nncf.quantize", "nncf": nncf.__version__, "model_type": "TRANSFORMER",
                    "preset": "PERFORMANCE (symmetric, default)", "calibration_batches": len(feeds),
                    "ignored_scope": {"router_matmuls": len(ign["router"]), "tail_ops": len(ign["tail"])},
                    "fake_quantize_nodes": fq}
        return Artifact(xml, "openvino", "int8", {**exported.info, "quantizer": settings})

    def finalize(self, artifact: Artifact, engine_dir: Path, cfg: CompileConfig) -> dict:
        shutil.copyfile(artifact.path, Path(engine_dir) / self.model_file)
        shutil.copyfile(artifact.path.with_suffix(".bin"), Path(engine_dir) / "openvino_model.bin")
        return {"model_file": self.model_file}

    def load(self, artifact, *, threads: int = 1, precision_hint: str = "f32"):
        from moe2edge.targets.runtime import OpenVinoEngine

        path = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
        return OpenVinoEngine(path, threads=threads, precision_hint=precision_hint)
