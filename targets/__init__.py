"""Compile targets: ONNX (ONNX Runtime), OpenVINO (+ NNCF INT8), TensorRT (QDQ ONNX + engine build).

    from moe2edge import targets
    targets.names()                   # ['onnx', 'openvino', 'tensorrt']  (the CLI's --target choices)
    t = targets.get("onnx")           # unknown names raise UnknownTargetError listing the valid ones
    t.is_available(); art = t.export(model, sample, out_dir, cfg); art = t.quantize(art, calib, cfg)
    engine = t.load(art); engine.run(input_ids, attention_mask)   # (B, D) unit rows

``targets.build.compile_engine`` runs export -> quantize -> verify -> manifest into an engine folder;
``targets.runtime.load_engine(dir).encode(texts)`` runs one without torch. Importing this package
imports neither torch nor any runtime.
"""

from moe2edge.targets.base import (
    Artifact, CalibrationError, CompileConfig, Engine, Sample, Target, TargetError, TargetUnavailableError,
    UnknownTargetError, VerificationError, get, names, register,
)

__all__ = [
    "Artifact", "CalibrationError", "CompileConfig", "Engine", "Sample", "Target", "TargetError",
    "TargetUnavailableError", "UnknownTargetError", "VerificationError", "get", "names", "register",
]
