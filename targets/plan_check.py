"""TensorRT plan verification: a plan counts as built only after it matched PyTorch on bundled real text.

What ``moe2edge compile --target tensorrt`` verifies on CPU is the Q/DQ ONNX run by ONNX Runtime; the
engine TensorRT builds from it on a GPU machine is another program (its own kernels, fusions and the
float precision of the sub-layers without Q/DQ -- the ones the INT8 fallback kept in float because
they were the most sensitive). So:

* at compile time ``write_bundle`` stores, in the engine folder, tokenised real texts (no tokenizer
  needed later) with PyTorch's fp32 embeddings and the verified Q/DQ ONNX's embeddings of them, and
  the gates (``targets/gates.py``) the compile used;
* ``build_engine.py`` (on the GPU machine) calls ``build_and_verify``: build with fp16 float
  sub-layers, run the plan on the bundle, keep it only if it passes the gates against PyTorch;
  otherwise build again with fp32 float sub-layers (TF32 off); a plan that fails is deleted (it is
  written under a temporary name and renamed only on pass). The record (gates, measured numbers vs
  PyTorch and vs the Q/DQ ONNX, the float precision chosen, the plan's sha256, TensorRT's version)
  goes into ``manifest.json`` under ``tensorrt_plan`` -- outside ``identity``, so the compile's
  ``identity_sha256`` stays the hash of what the compile produced;
* the runtime opens ``engine.plan`` only with a passing record whose sha256 is the file's
  (``check_plan_record``).

Dimension legend: B batch, S sequence, D output dim.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from moe2edge.targets.gates import gate_problems, parity

log = logging.getLogger(__name__)

BUNDLE_FILE = "plan_verification.npz"
PLAN_FILE = "engine.plan"
RECORD_KEY = "tensorrt_plan"
FLOAT_PRECISIONS = ("fp16", "fp32")  # tried in this order; fp16 is kept only if it verifies


class PlanVerificationError(RuntimeError):
    """No built plan passed the gates; carries every attempt's record."""

    def __init__(self, message: str, attempts: list[dict]):
        super().__init__(message)
        self.attempts = attempts


def write_bundle(engine_dir: Path, batches: list[tuple[np.ndarray, np.ndarray]], torch_ref: np.ndarray,
                 qdq_ref: np.ndarray, thresholds: dict) -> Path:
    """Store the plan's verification inputs: batches of (ids, mask) (B, S) int64, PyTorch's and the Q/DQ
    ONNX's (N, D) embeddings, the gates (JSON)."""
    arrays = {}
    for i, (ids, mask) in enumerate(batches):
        arrays[f"ids_{i}"], arrays[f"mask_{i}"] = np.asarray(ids, np.int64), np.asarray(mask, np.int64)
    path = Path(engine_dir) / BUNDLE_FILE
    np.savez_compressed(path, torch_ref=np.asarray(torch_ref, np.float32), qdq_ref=np.asarray(qdq_ref, np.float32),
                        thresholds=np.array(json.dumps(thresholds)), batches=np.array(len(batches)), **arrays)
    return path


def verify_plan(run: Callable[[np.ndarray, np.ndarray], np.ndarray], bundle: str | Path) -> dict:
    """Run ``run(ids, mask) -> (B, D)`` on the bundle; -> {"passed", "problems", "vs_pytorch", "vs_qdq_onnx",
    "thresholds"}. The gates are the compile's, against PyTorch fp32; agreement with the Q/DQ ONNX is recorded."""
    z = np.load(bundle)
    thr = json.loads(str(z["thresholds"]))
    got = np.concatenate([np.asarray(run(z[f"ids_{i}"], z[f"mask_{i}"]), np.float32) for i in range(int(z["batches"]))])
    ref, qdq = z["torch_ref"], z["qdq_ref"]
    if got.shape != ref.shape:
        return {"passed": False, "problems": [f"output shape {got.shape} != {ref.shape}"], "thresholds": thr}
    vs_torch, vs_qdq = parity(ref, got), parity(qdq, got)
    problems = gate_problems(vs_torch, {**thr, "ndcg_rel_loss": None})  # no pairs in the bundle: no nDCG here
    return {"passed": not problems, "problems": problems, "thresholds": thr, "vs_pytorch": vs_torch,
            "vs_qdq_onnx": vs_qdq, "texts": int(len(ref))}


def _sha256(path: Path) -> str:
    from moe2edge._io import sha256_file

    return sha256_file(path)


def write_record(engine_dir: Path, record: dict) -> None:
    """``manifest.json``'s ``tensorrt_plan`` := record (atomic: temp + rename; ``identity`` untouched)."""
    mpath = Path(engine_dir) / "manifest.json"
    man = json.loads(mpath.read_text(encoding="utf-8"))
    man[RECORD_KEY] = record
    tmp = mpath.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(man, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, mpath)


def build_and_verify(engine_dir: str | Path, *, build: Callable[[str], bytes],
                     open_runner: Callable[[Path], Callable], precisions=FLOAT_PRECISIONS,
                     versions: dict | None = None) -> dict:
    """Build a plan per float precision (``build("fp16" | "fp32") -> serialized plan``), verify each with
    ``open_runner(plan_path)(ids, mask)``, keep the first that passes as ``engine.plan`` and record it in
    the manifest; -> the record. None passes -> ``PlanVerificationError``, no plan left, the failed
    attempts recorded (``passed: false``) so the runtime keeps refusing."""
    engine_dir = Path(engine_dir)
    bundle = engine_dir / BUNDLE_FILE
    if not bundle.exists():
        raise FileNotFoundError(f"{bundle}: no plan verification inputs; recompile the folder with this moe2edge")
    plan, tmp = engine_dir / PLAN_FILE, engine_dir / (".tmp-" + PLAN_FILE)
    plan.unlink(missing_ok=True)  # an old plan must not survive next to a new record
    attempts = []
    for prec in precisions:
        tmp.write_bytes(bytes(build(prec)))
        try:
            res = verify_plan(open_runner(tmp), bundle)
        except Exception as e:  # a plan that cannot run is a failed plan
            res = {"passed": False, "problems": [f"running the plan failed: {type(e).__name__}: {e}"]}
        res["float_precision"] = prec
        attempts.append(res)
        log.info("TensorRT plan with %s float sub-layers: %s", prec, "passed" if res["passed"] else res["problems"])
        if res["passed"]:
            sha = _sha256(tmp)
            os.replace(tmp, plan)
            record = {"passed": True, "plan_file": PLAN_FILE, "plan_sha256": sha, "float_precision": prec,
                      "verification": res, "attempts": attempts, "versions": versions or {},
                      "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_record(engine_dir, record)
            return record
        tmp.unlink(missing_ok=True)
    write_record(engine_dir, {"passed": False, "attempts": attempts, "versions": versions or {}})
    raise PlanVerificationError(
        "no TensorRT plan passed verification against PyTorch on the bundled texts: "
        + "; ".join(f"{a['float_precision']}: {', '.join(a['problems'])}" for a in attempts)
        + " -- no engine.plan written", attempts)


def check_plan_record(engine_dir: str | Path, plan: str | Path) -> dict:
    """The passing record of ``plan`` in the folder's manifest, or ``EngineFolderError`` saying how to rebuild."""
    from moe2edge.targets.runtime import EngineFolderError

    engine_dir, plan = Path(engine_dir), Path(plan)
    how = f"rebuild it with `python {engine_dir / 'build_engine.py'}` (it verifies the plan before keeping it)"
    mpath = engine_dir / "manifest.json"
    rec = json.loads(mpath.read_text(encoding="utf-8")).get(RECORD_KEY) if mpath.exists() else None
    if not rec or not rec.get("passed"):
        raise EngineFolderError(f"{plan}: no passing verification record in {mpath.name} (an unverified TensorRT "
                                f"plan is not loaded); {how}")
    if rec.get("plan_sha256") != _sha256(plan):
        raise EngineFolderError(f"{plan}: sha256 differs from the verified plan recorded in {mpath.name}; {how}")
    return rec
