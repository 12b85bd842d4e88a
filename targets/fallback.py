"""Accuracy-aware INT8: keep the few most sensitive MatMuls in float until the graph passes.

Post-training INT8 of a small BERT misses cosine 0.99 because of a handful of MatMuls whose input
activations have outlier channels (LayerNorm outputs, GELU outputs): one per-tensor scale for them
costs more than the other twenty MatMuls together. Measured on all-MiniLM-L6-v2 (TensorRT-style
symmetric QDQ, each MatMul quantised alone): layer 0's FFN down-projection alone gives cosine min
0.919, layer 0's up-projection 0.9967, most others >= 0.9995. The fix every deployment stack offers
(TensorRT/Polygraphy layer precisions, NNCF accuracy control, ModelOpt's disabled quantizers) is a
mixed-precision fallback; this module searches it:

1. quantise everything quantisable; run the quantised and the float graph on *probe* batches (their
   own source-package groups: neither calibration nor verification text, so verification stays an
   independent check);
2. if the probe gate fails (``targets.gates.probe_gate``: the INT8 gates -- cosine min, set SQNR --
   minus the gap measured between the probe's two halves): for every group of MatMuls (one
   transformer sub-layer: e.g. all 8 experts' up-projections of one MoE layer are one group)
   quantise with that group left in float and record the probe score -- the group's sensitivity;
3. leave groups in float, most sensitive first, until the probe gate passes or ``max_groups`` are
   used. The result (groups kept in float, every measured score) goes into the manifest.

``quantize(exclude) -> path`` must be cheap to call repeatedly: the static quantisers pass an ORT
calibration cache so the activation ranges are computed once.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

import numpy as np

from moe2edge.targets.gates import cosines, probe_gate

log = logging.getLogger(__name__)


def cos_min(ref: np.ndarray, got: np.ndarray) -> float:
    if not np.isfinite(got).all():
        return float("-inf")
    return float(cosines(ref, got).min())


def _module_name(node, weight: str | None, consumers: dict, inits: set) -> str:
    """A readable module name for a MatMul: its weight initializer's name when the exporter kept it
    (``...mlp.fc1.3``), else the bias its output is added to (``...layers.0.mlp.fc1.bias``: dynamo
    renames pre-transposed weights to ``val_N``), else the node name."""
    if weight and not re.fullmatch(r"val_\d+", weight):
        return re.sub(r"\.weight$", "", weight)
    for c in consumers.get(node.output[0], []):
        if c.op_type == "Add":
            bias = next((i for i in c.input if i in inits and i.endswith(".bias")), None)
            if bias:
                return bias[: -len(".bias")]
    return node.name


def matmul_groups(model, candidates: list[str]) -> dict[str, list[str]]:
    """Group quantisable MatMul node names by the module they belong to, experts merged:
    ``...layers.3.mlp.fc1.5`` and ``...fc1.0`` -> one group ``...layers.3.mlp.fc1``.
    ``model``: an ``onnx.ModelProto`` or a path to one."""
    import onnx

    from moe2edge.targets.onnx_graph import matmul_nodes

    g = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    weight = {r["name"]: r["weight"] for r in matmul_nodes(g)}
    nodes = {n.name: n for n in g.graph.node}
    inits = {i.name for i in g.graph.initializer}
    consumers: dict[str, list] = {}
    for n in g.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    groups: dict[str, list[str]] = {}
    for name in candidates:
        key = _module_name(nodes[name], weight.get(name), consumers, inits)
        key = re.sub(r"^model\.", "", re.sub(r"(mlp\.fc[12])\.\d+$", r"\1", key))  # experts -> one group
        groups.setdefault(key, []).append(name)
    return groups


def probe_embeddings(path: str | Path, batches) -> np.ndarray:
    from moe2edge.targets.runtime import OrtEngine

    eng = OrtEngine(path, threads=1)
    return np.concatenate([eng.run(ids, mask) for ids, mask in batches])


def search(*, quantize: Callable[[list[str]], Path], reference: np.ndarray, run: Callable[[Path], np.ndarray],
           groups: dict[str, list[str]], base_exclude: list[str], gate: Callable[[np.ndarray, np.ndarray], dict],
           max_groups: int) -> tuple[list[str], dict]:
    """-> (nodes to exclude, report). ``reference``: the float graph's probe embeddings; ``gate(reference,
    got) -> {"score_db", "passed", "cos_min", ...}`` (``targets.gates.probe_gate``): higher score is better."""
    def measure(extra: list[str]) -> dict:
        return gate(reference, run(quantize(base_exclude + extra)))

    report: dict = {"probe_texts": int(len(reference)), "groups": len(groups)}
    full = measure([])
    report["all_quantized"] = full
    report["all_quantized_probe_cos_min"] = full["cos_min"]
    if full["passed"] or max_groups <= 0 or not groups:
        report.update(kept_float=[], final=full, final_probe_cos_min=full["cos_min"], reached=full["passed"])
        return list(base_exclude), report
    sens = {k: measure(v) for k, v in groups.items()}  # the probe gate with only group k in float
    order = sorted(sens, key=lambda k: -sens[k]["score_db"])
    report["sensitivity_score_db_if_float"] = {k: sens[k]["score_db"] for k in order}
    kept: list[str] = []
    extra: list[str] = []
    got = full
    for k in order[:max_groups]:
        kept.append(k)
        extra += groups[k]
        got = measure(extra)
        log.info("INT8 fallback: %s in float -> probe cosine min %.5f, SQNR %.2f dB, score %+.2f dB", k,
                 got["cos_min"], got.get("sqnr_db", float("nan")), got["score_db"])
        if got["passed"]:
            break
    report.update(kept_float=kept, final=got, final_probe_cos_min=got["cos_min"], reached=got["passed"])
    return list(base_exclude) + extra, report


def quantize_accuracy_aware(src: Path, dst: Path, calibration, cfg, *, base_exclude: list[str],
                            quantize_to: Callable[[list[str], Path], dict], probe=None) -> dict:
    """Quantise ``src`` into ``dst`` with ``quantize_to(exclude, path) -> settings``, leaving the most
    sensitive MatMul groups in float until the INT8 gates of ``cfg`` (a CompileConfig) pass on the probe
    set with the margin of ``targets.gates.probe_gate``; -> settings with the search report under
    ``"fallback"``. ``probe``: ``(batches_a, batches_b)``, two halves of disjoint source-package groups,
    disjoint from calibration and verification (``build.compile_engine`` makes them); None falls back
    to the calibration batches (not independent: a warning)."""
    import onnx

    from moe2edge.targets.onnx_graph import matmul_nodes

    g = onnx.load(str(src), load_external_data=False)
    candidates = [r["name"] for r in matmul_nodes(g) if r["weight"] is not None and r["name"] not in base_exclude]
    if probe is None:
        log.warning("INT8 fallback: no probe set given; probing on calibration batches (not independent of them)")
        cal = list(calibration)[: max(1, cfg.int8_fallback_probe_batches)]
        probe = (cal[: len(cal) // 2], cal[len(cal) // 2:])
    batches_a, batches_b = list(probe[0]), list(probe[1])
    batches = batches_a + batches_b
    reference = probe_embeddings(src, batches)
    n_a = sum(len(ids) for ids, _ in batches_a)
    trial = dst.parent / "fallback-trial.onnx"
    last: dict = {}

    def quantize(exclude: list[str]) -> Path:
        last.update(exclude=sorted(exclude), settings=quantize_to(exclude, trial))
        return trial

    def gate(ref, got):
        return probe_gate(ref, got, n_a, cos_min=cfg.int8_cos_min, sqnr=cfg.int8_sqnr_db)

    exclude, report = search(quantize=quantize, reference=reference, run=lambda p: probe_embeddings(p, batches),
                             groups=matmul_groups(g, candidates), base_exclude=list(base_exclude), gate=gate,
                             max_groups=cfg.int8_fallback_groups)
    report.update(probe_halves=[n_a, len(reference) - n_a], gate="INT8 gates on the probe set minus the gap "
                  "between its two halves (targets/gates.probe_gate)")
    if last.get("exclude") == sorted(exclude):  # the search's last trial is the answer: keep it
        from moe2edge.targets.onnx_graph import move_onnx

        move_onnx(trial, dst)  # with its external data file, if any
        settings = last["settings"]
    else:
        from moe2edge.targets.onnx_graph import external_data_locations

        for loc in external_data_locations(trial):
            (trial.parent / loc).unlink(missing_ok=True)
        trial.unlink(missing_ok=True)
        settings = quantize_to(exclude, dst)
    settings["fallback"] = report
    return settings
