"""TensorRT target: an explicitly quantised (Q/DQ) ONNX, verified on CPU, plus the engine build.

TensorRT's explicit-quantisation INT8 wants (hardware constraint, TensorRT developer guide, "Explicit
Quantization"): symmetric int8 (zero point 0) everywhere, per-channel scales on weights (axis = output
channel), per-tensor scales on activations, as QuantizeLinear/DequantizeLinear pairs around the ops
to run in int8. We produce that with ONNX Runtime's ``quantize_static(QuantFormat.QDQ,
ActivationSymmetric=True, WeightSymmetric=True, per_channel=True)`` on MatMul/Gemm only, and check
that no Q/DQ sits on the additive attention-mask path (ModelOpt's defaults put one there: cosine 0.5
measured). Router MatMuls, activation x activation MatMuls and the post-GELU down-projections stay
fp32 (fp16 in the engine), as in the ONNX target's static mode. Symmetric per-tensor activations
still miss cosine 0.99 on MiniLM (0.974-0.982 min: many sub-layers each lose a little), so the
accuracy-aware search of ``targets/fallback.py`` leaves the most sensitive sub-layers in float until
the probe (text of its own package groups) passes; which ones is recorded in the manifest.

The engine step needs ``tensorrt`` and a CUDA GPU. Where they are absent (this project's CPU
machines: PyPI's tensorrt wheels are stubs that download from NVIDIA), ``--target tensorrt`` still
writes the verified QDQ ONNX, ``build_engine.sh`` (the exact ``trtexec`` command) and
``build_engine.py`` (the same through the Python API: builder, ONNX parser, one optimisation profile
for the batch x sequence range, INT8 + FP16 flags so layers without Q/DQ fall back to fp16).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from moe2edge._optional import has, require
from moe2edge.targets.base import Artifact, CompileConfig, Sample

log = logging.getLogger(__name__)

PLAN_FILE = "engine.plan"

BUILD_PY = '''"""Build the TensorRT engine for this folder (needs tensorrt >= 10 and a CUDA GPU).

    python build_engine.py            # writes engine.plan next to this file

Explicit quantisation: the ONNX carries Q/DQ pairs, so no calibrator is used; INT8 + FP16 are
both enabled so that layers without Q/DQ run in fp16 instead of fp32.
"""
import json
import sys
from pathlib import Path

import tensorrt as trt

HERE = Path(__file__).resolve().parent
ONNX = HERE / {onnx!r}
PROFILE = {profile!r}  # input name -> (min, opt, max) shapes (batch, sequence)
INT8 = {int8!r}


def build(onnx_path=ONNX, plan_path=HERE / {plan!r}, workspace_gib=4):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "\\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        sys.exit(f"ONNX parse failed:\\n{{errors}}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    config.set_flag(trt.BuilderFlag.FP16)  # fallback precision for layers without Q/DQ
    if INT8:
        config.set_flag(trt.BuilderFlag.INT8)  # honour the Q/DQ pairs (explicit quantisation)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in PROFILE.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        sys.exit("engine build failed (see the TensorRT log above)")
    Path(plan_path).write_bytes(bytes(plan))
    print(f"wrote {{plan_path}}")


if __name__ == "__main__":
    build()
'''


def trtexec_command(onnx_name: str, cfg: CompileConfig, int8: bool) -> str:
    def shapes(s):
        return f"input_ids:{s[0]}x{s[1]},attention_mask:{s[0]}x{s[1]}"

    flags = "--int8 --fp16" if int8 else "--fp16"
    return (f"trtexec --onnx={onnx_name} {flags} --minShapes={shapes(cfg.trt_min_shape)} "
            f"--optShapes={shapes(cfg.trt_opt_shape)} --maxShapes={shapes(cfg.trt_max_shape)} "
            f"--saveEngine={PLAN_FILE}")


class TensorRTTarget:
    name = "tensorrt"
    runtime = "tensorrt"
    runtime_extra = "onnx"  # what the CPU part (QDQ ONNX + verification) needs
    cpu_verifiable = True  # the QDQ ONNX is built and verified with ONNX Runtime where TensorRT is absent

    def is_available(self) -> bool:
        """TensorRT engine building possible here (tensorrt importable and a CUDA GPU visible)."""
        if not has("tensorrt"):
            return False
        try:
            import tensorrt  # noqa: F401
            from cuda import cudart  # type: ignore  # noqa: F401
        except ImportError:
            return has("torch") and __import__("torch").cuda.is_available()
        return True

    def require(self) -> None:
        for mod in ("onnx", "onnxscript", "onnxruntime"):
            require(mod, extra="onnx", purpose="--target tensorrt (QDQ ONNX + CPU verification)")

    def export(self, model, sample: Sample, out_dir: Path, cfg: CompileConfig) -> Artifact:
        from moe2edge.targets.torch_export import export_onnx

        path = export_onnx(model, sample, Path(out_dir) / "model.fp32.onnx", dim=cfg.dim,
                           all_experts=cfg.all_experts, opset=cfg.opset)
        return Artifact(path, "tensorrt", "fp32", {"exporter": "torch.onnx.export(dynamo=True)", "opset": cfg.opset,
                                                   "routing": "all-experts" if cfg.all_experts else "sparse"})

    def quantize(self, exported: Artifact, calibration, cfg: CompileConfig, *, probe=None) -> Artifact:
        import onnx

        from moe2edge.targets.onnx_graph import check_no_qdq_on_mask, qdq_summary
        from moe2edge.targets.onnx_target import excluded_matmuls, ort_quantize_static

        exclude, info = excluded_matmuls(exported.path, keep_attention=cfg.quantize_attention_matmuls,
                                         exclude_post_gelu=cfg.static_skip_post_gelu)
        from moe2edge.targets.fallback import quantize_accuracy_aware

        dst = exported.path.parent / "model_qdq.onnx"
        cache = exported.path.parent / "calibration-cache.json"
        settings = quantize_accuracy_aware(
            exported.path, dst, calibration, cfg, base_exclude=exclude, probe=probe,
            quantize_to=lambda excl, path: ort_quantize_static(exported.path, path, calibration,
                                                               symmetric_activations=True, exclude=excl, cache=cache))
        q = onnx.load(str(dst))
        check_no_qdq_on_mask(q)
        zero_points = [i for i in q.graph.initializer if i.name.endswith("_zero_point")]
        if any(onnx.numpy_helper.to_array(z).any() for z in zero_points):
            raise RuntimeError("TensorRT needs symmetric Q/DQ (zero point 0); the quantiser wrote a non-zero one")
        settings.update(graph=info, nodes=qdq_summary(q), hardware_constraint="TensorRT explicit quantization: "
                        "symmetric int8, per-channel weights, per-tensor activations, Q/DQ pairs")
        return Artifact(dst, "tensorrt", "int8", {**exported.info, "quantizer": settings})

    def finalize(self, artifact: Artifact, engine_dir: Path, cfg: CompileConfig) -> dict:
        engine_dir = Path(engine_dir)
        int8 = artifact.precision == "int8"
        name = "model_qdq.onnx" if int8 else "model.onnx"
        shutil.copyfile(artifact.path, engine_dir / name)
        profile = {n: (tuple(cfg.trt_min_shape), tuple(cfg.trt_opt_shape), tuple(cfg.trt_max_shape))
                   for n in ("input_ids", "attention_mask")}
        cmd = trtexec_command(name, cfg, int8)
        (engine_dir / "build_engine.sh").write_text(
            "#!/bin/sh\n# Needs TensorRT (trtexec) and a CUDA GPU; run inside this folder.\nset -e\n"
            f'cd "$(dirname "$0")"\n{cmd}\n', encoding="utf-8")
        (engine_dir / "build_engine.sh").chmod(0o755)
        (engine_dir / "build_engine.py").write_text(
            BUILD_PY.format(onnx=name, profile=profile, int8=int8, plan=PLAN_FILE), encoding="utf-8")
        if not self.is_available():
            log.warning("TensorRT engine NOT built: it needs tensorrt + a CUDA GPU. Wrote the verified %s and "
                        "build_engine.sh / build_engine.py: run one of them on a GPU machine", name)
        return {"model_file": name, "plan_file": PLAN_FILE, "trtexec": cmd,
                "engine_status": "engine.plan not built here: needs TensorRT + a CUDA GPU (run build_engine.sh); "
                                 "until then the QDQ ONNX runs on CPU with ONNX Runtime"}

    def load(self, artifact, *, threads: int = 1):
        from moe2edge.targets.runtime import OrtEngine, TensorRTEngine

        path = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
        plan = path.parent / PLAN_FILE
        if plan.exists() and self.is_available():
            return TensorRTEngine(plan)
        return OrtEngine(path, threads=threads)
