"""ONNX target: ``torch.onnx.export(dynamo=True)`` graph, run by ONNX Runtime (CPU).

INT8 has two flavours (``CompileConfig.ort_quant``), both on MatMul weights only, per output channel:

* ``dynamic`` (default, measured better here): int8 per-channel weights, activation scales computed
  per batch at run time (``per_channel=True``: per-tensor measured cosine ~0.94 on MiniLM);
* ``static``: QDQ format, activation ranges calibrated (MinMax) on real text, uint8 asymmetric
  activations x int8 symmetric per-channel weights (ORT CPU's QDQ pair, VNNI u8s8); the FFN
  down-projections (post-GELU input) stay fp32 by default (``static_skip_post_gelu``).

Both flavours go through the accuracy-aware search of ``targets/fallback.py``: when the INT8 gates
fail on the probe set (its own package groups, with a margin measured between its halves), the most
sensitive sub-layers stay in float (recorded in the manifest under ``quantizer.fallback``).

Never quantised: the MoE router (a flipped top-k moves a token to another expert), activation x
activation MatMuls (QK^T, PV: softmax probabilities and the additive -inf mask path), and the
pooling / normalisation tail (no MatMul there). ORT's offline basic optimisation runs first.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from moe2edge._optional import has, require
from moe2edge.targets.base import Artifact, CompileConfig, Sample
from moe2edge.targets.fallback import quantize_accuracy_aware
from moe2edge.targets.onnx_graph import copy_onnx, external_data_locations

log = logging.getLogger(__name__)


CALIB_ROWS_PER_RUN = 4


class CalibReader:
    """onnxruntime.quantization.CalibrationDataReader over [(ids, mask), ...] numpy batches, fed to ORT in
    runs of at most ``rows`` texts with the padding columns no text of the run uses cut off: the same real
    tokens, a smaller session. ORT's calibration session keeps far more than one run's live tensors: at the
    released shape a 16-text run took the tensorrt target past 23 GB (OOM-killed) where 4-text runs peak at
    9.2 GB (measured, docs/benchmarks.md "Full shape")."""

    def __init__(self, batches, input_names, rows: int | None = None):
        rows = rows or CALIB_ROWS_PER_RUN
        self.input_names, self.i = set(input_names), 0
        self.batches = []
        for ids, mask in batches:
            ids, mask = np.asarray(ids, np.int64), np.asarray(mask, np.int64)
            for s in range(0, len(ids), rows):
                m = mask[s : s + rows]
                used = np.flatnonzero(m.any(0))
                n = int(used[-1]) + 1 if used.size else m.shape[1]
                self.batches.append((ids[s : s + rows, :n], m[:, :n]))

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        ids, mask = self.batches[self.i]
        self.i += 1
        feed = {"input_ids": ids, "attention_mask": mask}
        return {k: v for k, v in feed.items() if k in self.input_names}

    def rewind(self):
        self.i = 0

    def __len__(self):
        return len(self.batches)


def excluded_matmuls(model_path: str | Path, *, keep_attention: bool = False,
                     exclude_post_gelu: bool = False) -> tuple[list[str], dict]:
    """Nodes kept in fp32: routers, activation x activation MatMuls (unless keep_attention) and, for
    static activation quantisation, the FFN down-projections whose input is a GELU output.

    Why the last: post-GELU activations are heavy-tailed; one per-tensor scale for them cost the
    upcycled MiniLM MoE cosine 0.94 (min over real texts) with MinMax calibration; keeping them in
    fp32 gives 0.9925 (measured; Percentile calibration fails on variable-length batches in ORT).
    """
    import onnx

    from moe2edge.targets.onnx_graph import matmul_nodes

    g = onnx.load(str(model_path), load_external_data=False)
    producer = {o: n for n in g.graph.node for o in n.output}
    rows = matmul_nodes(g)
    router = [r["name"] for r in rows if r["router"]]
    act = [r["name"] for r in rows if r["weight"] is None]
    nodes = {n.name: n for n in g.graph.node}
    post_gelu = [r["name"] for r in rows if r["weight"] is not None
                 and getattr(producer.get(nodes[r["name"]].input[0]), "op_type", "") == "Gelu"]
    excl = router + ([] if keep_attention else act) + (post_gelu if exclude_post_gelu else [])
    info = {"matmuls": len(rows), "excluded_router": len(router),
            "excluded_activation_matmuls": 0 if keep_attention else len(act),
            "excluded_post_gelu": len(post_gelu) if exclude_post_gelu else 0, "quantized_matmuls": len(rows) - len(excl)}
    return excl, info


def ort_quantize_static(src: Path, dst: Path, calibration, *, symmetric_activations: bool, exclude: list[str],
                        op_types=("MatMul", "Gemm"), cache: Path | None = None) -> dict:
    """QDQ static INT8 with per-channel symmetric int8 weights; returns the settings (for the manifest).

    ``cache``: ORT's calibration cache (JSON of tensor ranges): the first call calibrates and writes
    it, later calls with other ``exclude`` sets reuse the ranges (the fallback search)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    settings = {
        "method": "onnxruntime.quantize_static", "quant_format": "QDQ", "per_channel": True,
        "weight_type": "QInt8", "weight_symmetric": True,
        "activation_type": "QInt8" if symmetric_activations else "QUInt8",
        "activation_symmetric": symmetric_activations, "calibrate_method": "MinMax",
        "calibration_rows_per_run": CALIB_ROWS_PER_RUN,
        "op_types_to_quantize": list(op_types), "nodes_to_exclude": sorted(exclude),
    }
    quantize_static(
        str(src), str(dst), CalibReader(calibration, ("input_ids", "attention_mask")),
        quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(op_types), nodes_to_exclude=exclude,
        extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True},
        calibration_cache_path=cache, use_external_data_format=bool(external_data_locations(src)),
    )
    return settings


def finalize_onnx(src: Path, dst: Path) -> dict:
    """engine.json keys for an ONNX graph copied to ``dst`` (``model_data_file`` when its weights are external)."""
    files = copy_onnx(src, dst)
    out = {"model_file": dst.name}
    if len(files) > 1:
        out["model_data_file"] = files[1].name
    return out


class OnnxTarget:
    name = "onnx"
    runtime = "onnxruntime"
    runtime_extra = "onnx"
    model_file = "model.onnx"

    def is_available(self) -> bool:
        return has("onnxruntime") and has("onnx") and has("onnxscript")

    def require(self) -> None:
        for mod in ("onnx", "onnxscript", "onnxruntime"):
            require(mod, extra=self.runtime_extra, purpose=f"--target {self.name}")

    def export(self, model, sample: Sample, out_dir: Path, cfg: CompileConfig) -> Artifact:
        from moe2edge.targets.torch_export import export_onnx

        self.require()
        path = export_onnx(model, sample, Path(out_dir) / "model.fp32.onnx", dim=cfg.dim,
                           all_experts=cfg.all_experts, opset=cfg.opset)
        return Artifact(path, "onnx", "fp32", {"exporter": "torch.onnx.export(dynamo=True)", "opset": cfg.opset,
                                               "routing": "all-experts" if cfg.all_experts else "sparse"})

    def quantize(self, exported: Artifact, calibration, cfg: CompileConfig, *, probe=None) -> Artifact:
        from moe2edge.targets.onnx_graph import check_no_qdq_on_mask, preoptimize, qdq_summary

        import onnx

        work = exported.path.parent
        src = exported.path
        if cfg.ort_preoptimize:
            src = preoptimize(src, work / "model.fp32.opt.onnx")
        exclude, info = excluded_matmuls(src, keep_attention=cfg.quantize_attention_matmuls,
                                         exclude_post_gelu=cfg.ort_quant == "static" and cfg.static_skip_post_gelu)
        dst = work / "model.int8.onnx"
        if cfg.ort_quant == "static":
            def quantize_to(excl, path):
                return ort_quantize_static(src, path, calibration, symmetric_activations=False, exclude=excl,
                                           cache=work / "calibration-cache.json")
        else:
            def quantize_to(excl, path):
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(str(src), str(path), per_channel=True, weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul"], nodes_to_exclude=excl,
                                 use_external_data_format=bool(external_data_locations(src)))
                return {"method": "onnxruntime.quantize_dynamic", "per_channel": True, "weight_type": "QInt8",
                        "op_types_to_quantize": ["MatMul"], "nodes_to_exclude": sorted(excl)}
        settings = quantize_accuracy_aware(src, dst, calibration, cfg, base_exclude=exclude, quantize_to=quantize_to,
                                           probe=probe)
        q = onnx.load(str(dst), load_external_data=False)  # the graph's structure is what is checked
        check_no_qdq_on_mask(q)
        settings.update(preoptimized=cfg.ort_preoptimize, graph=info, nodes=qdq_summary(q))
        return Artifact(dst, "onnx", "int8", {**exported.info, "quantizer": settings})

    def finalize(self, artifact: Artifact, engine_dir: Path, cfg: CompileConfig) -> dict:
        """Copy the artifact's model (+ its external data, as ``model.onnx.data``) into the engine folder under its
        canonical name -> engine.json keys."""
        return finalize_onnx(artifact.path, Path(engine_dir) / self.model_file)

    def load(self, artifact, *, threads: int = 1):
        from moe2edge.targets.runtime import OrtEngine

        path = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
        return OrtEngine(path, threads=threads)
