"""TensorRT target: an explicitly quantised (Q/DQ) ONNX, verified on CPU, plus the engine build.

TensorRT's explicit-quantisation INT8 wants (hardware constraint, TensorRT developer guide, "Explicit
Quantization"): symmetric int8 (zero point 0) everywhere, per-channel scales on weights (axis = output
channel), per-tensor scales on activations, as QuantizeLinear/DequantizeLinear pairs around the ops
to run in int8. We produce that with ONNX Runtime's ``quantize_static(QuantFormat.QDQ,
ActivationSymmetric=True, WeightSymmetric=True, per_channel=True)`` on MatMul/Gemm only, and check
that no Q/DQ sits on the additive attention-mask path (ModelOpt's defaults put one there: cosine 0.5
measured). Router MatMuls, activation x activation MatMuls and the post-GELU down-projections stay
float (fp16 in the engine only if the plan verifies, else fp32), as in the ONNX target's static mode. Symmetric per-tensor activations
still miss cosine 0.99 on MiniLM (0.974-0.982 min: many sub-layers each lose a little), so the
accuracy-aware search of ``targets/fallback.py`` leaves the most sensitive sub-layers in float until
the probe (text of its own package groups) passes; which ones is recorded in the manifest.

The engine step needs ``tensorrt`` and a CUDA GPU. Where they are absent (this project's CPU
machines: PyPI's tensorrt wheels are stubs that download from NVIDIA), ``--target tensorrt`` still
writes the verified QDQ ONNX, ``plan_verification.npz`` (tokenised real texts with PyTorch's and
the QDQ ONNX's embeddings), ``build_engine.py`` (builder, ONNX parser, one optimisation profile for
the batch x sequence range; float sub-layers in fp16, kept only if the plan verifies, else fp32:
``targets/plan_check.py``) and ``build_engine.sh`` (runs it; the bare ``trtexec`` line is a comment).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from moe2edge._optional import has, require
from moe2edge.targets.base import Artifact, CompileConfig, Sample

log = logging.getLogger(__name__)

PLAN_FILE = "engine.plan"

BUILD_PY = '''"""Build the TensorRT engine for this folder and verify it before keeping it (tensorrt >= 10, a CUDA GPU,
moe2edge + numpy installed).

    python build_engine.py            # writes engine.plan next to this file only if it verifies

Explicit quantisation: the ONNX carries Q/DQ pairs, so no calibrator is used. The sub-layers without
Q/DQ (routers, attention score MatMuls, and the ones the INT8 fallback kept in float because they
were the most sensitive) are first built in fp16; the plan is run on the real texts bundled in
plan_verification.npz and must pass the compile's gates against PyTorch's stored embeddings. If it
does not, the float sub-layers are built in fp32 (TF32 off) and verified again. A plan that fails is
deleted; the verification record goes into manifest.json ("tensorrt_plan"), and moe2edge's runtime
loads engine.plan only with a passing record.
"""
import sys
from pathlib import Path

import tensorrt as trt

HERE = Path(__file__).resolve().parent
ONNX = HERE / {onnx!r}
PROFILE = {profile!r}  # input name -> (min, opt, max) shapes (batch, sequence)
INT8 = {int8!r}


def build(float_precision, onnx_path=ONNX, workspace_gib=4):
    """Serialized plan; float_precision: "fp16" or "fp32" for the layers without Q/DQ."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: finds external weight data beside it
        errors = "\\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        sys.exit(f"ONNX parse failed:\\n{{errors}}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    if float_precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 GEMMs keep a 10-bit mantissa
    if INT8:
        config.set_flag(trt.BuilderFlag.INT8)  # honour the Q/DQ pairs (explicit quantisation)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in PROFILE.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        sys.exit("engine build failed (see the TensorRT log above)")
    return bytes(plan)


def main():
    from moe2edge.targets.plan_check import PlanVerificationError, build_and_verify
    from moe2edge.targets.runtime import TensorRTEngine

    try:
        rec = build_and_verify(HERE, build=build, open_runner=lambda p: TensorRTEngine(p).run,
                               versions={{"tensorrt": trt.__version__}})
    except PlanVerificationError as e:
        sys.exit(str(e))
    v = rec["verification"]["vs_pytorch"]
    print(f"wrote {{HERE / rec['plan_file']}}: {{rec['float_precision']}} float sub-layers, verified on "
          f"{{v['n']}} texts: cosine min {{v['cos_min']:.5f}}, SQNR {{v['sqnr_db']:.1f}} dB")


if __name__ == "__main__":
    main()
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
        q = onnx.load(str(dst), load_external_data=False)  # structure + small (inline) tensors
        check_no_qdq_on_mask(q)
        zero_points = [i for i in q.graph.initializer if i.name.endswith("_zero_point")]
        if any(onnx.numpy_helper.to_array(z, base_dir=str(dst.parent)).any() for z in zero_points):
            raise RuntimeError("TensorRT needs symmetric Q/DQ (zero point 0); the quantiser wrote a non-zero one")
        settings.update(graph=info, nodes=qdq_summary(q), hardware_constraint="TensorRT explicit quantization: "
                        "symmetric int8, per-channel weights, per-tensor activations, Q/DQ pairs")
        return Artifact(dst, "tensorrt", "int8", {**exported.info, "quantizer": settings})

    def finalize(self, artifact: Artifact, engine_dir: Path, cfg: CompileConfig) -> dict:
        engine_dir = Path(engine_dir)
        int8 = artifact.precision == "int8"
        name = "model_qdq.onnx" if int8 else "model.onnx"
        from moe2edge.targets.onnx_target import finalize_onnx

        keys = finalize_onnx(artifact.path, engine_dir / name)
        profile = {n: (tuple(cfg.trt_min_shape), tuple(cfg.trt_opt_shape), tuple(cfg.trt_max_shape))
                   for n in ("input_ids", "attention_mask")}
        cmd = trtexec_command(name, cfg, int8)
        (engine_dir / "build_engine.sh").write_text(
            "#!/bin/sh\n# Needs TensorRT, a CUDA GPU, moe2edge + numpy. Builds AND verifies engine.plan (build_engine.py).\n"
            "# The bare trtexec equivalent (its plan is unverified: the runtime refuses it):\n"
            f"#   {cmd}\nset -e\n"
            'cd "$(dirname "$0")"\nexec python3 build_engine.py "$@"\n', encoding="utf-8")
        (engine_dir / "build_engine.sh").chmod(0o755)
        (engine_dir / "build_engine.py").write_text(
            BUILD_PY.format(onnx=name, profile=profile, int8=int8, plan=PLAN_FILE), encoding="utf-8")
        if not self.is_available():
            log.warning("TensorRT engine NOT built: it needs tensorrt + a CUDA GPU. Wrote the verified %s and "
                        "build_engine.sh / build_engine.py: run one of them on a GPU machine", name)
        return {**keys, "plan_file": PLAN_FILE, "trtexec": cmd,
                "engine_status": "engine.plan not built here: needs TensorRT + a CUDA GPU (run build_engine.sh, "
                                 "which verifies the plan on plan_verification.npz); until then the QDQ ONNX runs "
                                 "on CPU with ONNX Runtime"}

    def bundle_verification(self, engine_dir: Path, model, tok, pairs, cfg: CompileConfig, dim: int,
                            thresholds: dict, *, texts: int = 64, batch_size: int = 16) -> dict:
        """Write plan_verification.npz: real texts (queries and documents of the verification pairs), tokenised
        within the optimisation profile, with PyTorch's fp32 and the verified ONNX's embeddings (plan_check)."""
        from moe2edge.targets.plan_check import write_bundle
        from moe2edge.targets.runtime import OrtEngine
        from moe2edge.targets.torch_export import reference_embeddings

        engine_dir = Path(engine_dir)
        spec_file = engine_dir / "engine.json"
        import json

        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        prompts = spec.get("prompts") or {}
        qp, dp = prompts.get("search_query", ""), prompts.get("search_document", "")
        half = texts // 2
        chosen = [qp + q for q, _ in pairs[:half]] + [dp + d for _, d in pairs[:half]]
        max_len = min(tok.max_length, cfg.trt_max_shape[1])
        bs = min(batch_size, cfg.trt_max_shape[0])
        old = tok.max_length
        tok.tok.enable_truncation(max_length=max_len)
        try:
            batches = [tuple(tok(chosen[s : s + bs])[:2]) for s in range(0, len(chosen), bs)]
        finally:
            tok.tok.enable_truncation(max_length=old)
        full = model.config.hidden_size
        torch_ref = reference_embeddings(model, batches, dim=None if dim == full else dim)
        ort = OrtEngine(engine_dir / spec["model_file"], threads=1)
        qdq_ref = np.concatenate([ort.run(i, m) for i, m in batches])
        path = write_bundle(engine_dir, batches, torch_ref, qdq_ref, thresholds)
        return {"file": path.name, "texts": len(chosen), "batches": len(batches), "max_length": max_len}

    def load(self, artifact, *, threads: int = 1):
        from moe2edge.targets.runtime import OrtEngine, TensorRTEngine

        path = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
        plan = path.parent / PLAN_FILE
        if plan.exists() and self.is_available():
            from moe2edge.targets.plan_check import check_plan_record

            check_plan_record(path.parent, plan)  # an unverified plan is refused
            return TensorRTEngine(plan)
        return OrtEngine(path, threads=threads)
