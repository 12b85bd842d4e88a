"""The target protocol, its settings, its errors and the registry (plain dict, ``register``/``get``).

A target turns an ``nn.Module`` embedder into a deployable artifact in four steps (house style):

    is_available() -> bool                                # is its runtime installed here?
    export(model, sample, out_dir, cfg) -> Artifact       # fp32 graph with pooling + L2 norm inside
    quantize(exported, calibration, cfg, probe=) -> Artifact  # INT8 from real calibration batches
    load(artifact) -> Engine                              # Engine.run(input_ids, attention_mask) -> (B, D)

This module imports nothing heavy (no torch, no runtime): the CLI reads target names from it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from moe2edge.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
# ORT INT8 flavours: static QDQ (calibrated activations) or dynamic (weights only, activations at run time).
ORT_QUANT_MODES = ("static", "dynamic")
OV_PRECISION_HINTS = ("f32", "bf16")


class TargetError(UserError):
    """Base of every compile-target error (each message names what to fix); a user error for the CLI."""


class UnknownTargetError(TargetError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class TargetUnavailableError(TargetError, ImportError):
    """The target's runtime is not installed (the message names the pip extra)."""


class CalibrationError(TargetError, ValueError):
    """Calibration data is missing, too short, or leaves an expert without tokens."""


class VerificationError(TargetError, ValueError):
    """A built artifact disagrees with the PyTorch model beyond the threshold; carries the numbers."""

    def __init__(self, message: str, parity: dict | None = None):
        super().__init__(message)
        self.parity = parity or {}


@dataclass
class CompileConfig:
    """Everything that decides what a compile produces (recorded in the manifest, hashed)."""

    target: str = "onnx"
    precision: str = "fp32"  # fp32 | int8
    dim: int | None = None  # Matryoshka output dim baked into the graph (None: full hidden size)
    opset: int = 20
    all_experts: bool = False  # dense routing (every expert on every token): the FLOP/speed baseline only
    # ONNX Runtime INT8
    ort_quant: str = "dynamic"  # dynamic (per-channel weights; measured best here) | static (QDQ, calibrated)
    static_skip_post_gelu: bool = True  # static/QDQ: keep FFN down-projections (post-GELU input) in fp32
    ort_preoptimize: bool = True  # ORT offline basic graph optimisation before quantising
    quantize_attention_matmuls: bool = False  # Q/DQ on activation x activation MatMuls (QK^T, PV)
    # Accuracy-aware INT8 (targets/fallback.py, ONNX + TensorRT): leave up to this many MatMul groups
    # (sub-layers) in float, most sensitive first, until the INT8 gates pass on the PROBE set (its own
    # source-package groups, neither calibration nor verification) with the margin measured between
    # its two halves (targets/gates.probe_gate); 0 disables the search.
    int8_fallback_groups: int = 8
    int8_fallback_probe_batches: int = 8  # probe batches used (half from each half; calibration_batch_size texts each)
    # OpenVINO
    ov_precision_hint: str = "f32"  # INFERENCE_PRECISION_HINT at run time (CPU default would be bf16 here)
    # Calibration / verification
    calibration_batch_size: int = 16
    min_calibration_texts: int = 32
    min_calibration_tokens: int = 2000
    # Gates (targets/gates.py; None turns one off). fp32: today's engines measure max-abs ~1e-7, a
    # tanh-GELU graph 4e-5 .. 2e-3; INT8: cosine 0.99 alone is ~17 dB, so the set's SQNR is gated too.
    fp32_cos_min: float = 0.99999
    fp32_max_abs: float | None = 1e-5
    int8_cos_min: float = 0.99
    int8_sqnr_db: float | None = 20.0  # 20 log10(||ref|| / ||ref - got||) over the whole verification set
    max_ndcg_rel_loss: float | None = 0.005  # RELATIVE nDCG@10 loss: (PyTorch - engine) / PyTorch
    # Router near-ties (targets/routing.py): tokens whose top-k router margin in the PyTorch reference is
    # below near_tie_eps may flip experts in any correct engine; fp32 is gated on the texts without one
    # (refused when fewer than near_tie_min_clean of the verification rows remain), INT8 on every text.
    near_tie_eps: float = 1e-5
    near_tie_min_clean: float = 0.5
    # TensorRT optimisation profile (batch x sequence ranges) for the engine build
    trt_min_shape: tuple[int, int] = (1, 1)
    trt_opt_shape: tuple[int, int] = (32, 128)
    trt_max_shape: tuple[int, int] = (64, 512)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.ort_quant not in ORT_QUANT_MODES:
            raise ValueError(f"ort_quant must be one of {', '.join(ORT_QUANT_MODES)}, got {self.ort_quant!r}")
        if self.ov_precision_hint not in OV_PRECISION_HINTS:
            raise ValueError(f"ov_precision_hint must be one of {', '.join(OV_PRECISION_HINTS)}")
        if self.int8_fallback_groups < 0 or self.int8_fallback_probe_batches < 1:
            raise ValueError("int8_fallback_groups must be >= 0 and int8_fallback_probe_batches >= 1")
        for k in ("fp32_max_abs", "int8_sqnr_db", "max_ndcg_rel_loss"):
            if getattr(self, k) is not None and getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0 or None, got {getattr(self, k)}")
        if self.near_tie_eps < 0 or not 0 <= self.near_tie_min_clean <= 1:
            raise ValueError("near_tie_eps must be >= 0 and near_tie_min_clean in [0, 1]")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")

    @property
    def cos_threshold(self) -> float:
        return self.int8_cos_min if self.precision == "int8" else self.fp32_cos_min

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("trt_min_shape", "trt_opt_shape", "trt_max_shape"):
            d[k] = list(d[k])
        return d


@dataclass
class Sample:
    """Example inputs for tracing: int64 (B, S) numpy arrays (B >= 2, S >= 2: no 1-specialisation)."""

    input_ids: Any
    attention_mask: Any


@dataclass
class Artifact:
    """One built model file (plus siblings) inside a build folder."""

    path: Path  # the main model file (model.onnx, openvino_model.xml, ...)
    target: str
    precision: str
    info: dict = field(default_factory=dict)  # quantiser settings, graph facts: go to the manifest

    @property
    def files(self) -> list[Path]:
        """Every file that belongs to the artifact (the main file first)."""
        sib = [Path(p) for p in self.info.get("extra_files", [])]
        return [self.path, *sib]


@runtime_checkable
class Engine(Protocol):
    def run(self, input_ids, attention_mask):  # (B, S) int64 -> (B, D) float32, unit rows
        ...


class Target(Protocol):
    name: str
    runtime_extra: str  # pip extra that brings its runtime

    def is_available(self) -> bool: ...

    def export(self, model, sample: Sample, out_dir: Path, cfg: CompileConfig) -> Artifact: ...

    def quantize(self, exported: Artifact, calibration: list, cfg: CompileConfig, *, probe=None) -> Artifact: ...

    def load(self, artifact: Artifact | Path, *, threads: int = 1) -> Engine: ...


# ------------------------------------------------------------------------------------ registry
# name -> "module:Class" (imported on first get(), so listing names stays free of heavy imports).
_REGISTRY: dict[str, str | type] = {}


def register(name: str, target: str | type) -> None:
    """Register a target class (or a lazy ``"module:Class"`` path) under ``name``."""
    if name in _REGISTRY and _REGISTRY[name] != target:
        raise ValueError(f"target {name!r} is already registered")
    _REGISTRY[name] = target


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Target:
    """A fresh instance of the target ``name``; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise UnknownTargetError(f"unknown target {name!r}; valid targets: {', '.join(names())}")
    obj = _REGISTRY[name]
    if isinstance(obj, str):
        import importlib

        mod, _, cls = obj.partition(":")
        obj = getattr(importlib.import_module(mod), cls)
    return obj()


register("onnx", "moe2edge.targets.onnx_target:OnnxTarget")
register("openvino", "moe2edge.targets.openvino_target:OpenVinoTarget")
register("tensorrt", "moe2edge.targets.tensorrt_target:TensorRTTarget")
