"""The numbers an engine must meet before it counts as built, and the INT8 fallback's probe gate.

Pure numpy, no torch: used by verification (``targets/build.py``), the INT8 fallback search
(``targets/fallback.py``) and TensorRT's plan check (``targets/plan_check.py``, run by the engine
folder's ``build_engine.py`` on a GPU machine).

Gates (``CompileConfig`` holds the thresholds; every one is recorded in the manifest, and a refusal
names the measured value and its threshold):

* fp32: per-text cosine min >= 0.99999 and max-abs difference <= 1e-5. Today's fp32 engines measure
  ~1e-7; the cosine gate alone is loose in 384-d (a per-coordinate error of ~7e-4 passes 0.9999), so
  the max-abs gate is what catches a tanh-GELU graph (4e-5 .. 2e-3 measured).
* INT8: per-text cosine min >= 0.99 *and* set-level SQNR >= 20 dB, ``20 log10(||ref|| / ||ref - got||)``
  over every text of the set (torchao's INT8 test). Both are SQNRs in disguise: for unit rows
  ``||r - g||^2 = 2 (1 - cos)``, so cosine 0.99 is 17.0 dB for the worst text and 20 dB over the set
  is a mean cosine of 0.995.
* both: nDCG@10 loss on the verification pairs <= 0.5 % of PyTorch's nDCG@10 (relative).

Dimension legend: N texts, D embedding dim.
"""

from __future__ import annotations

import math

import numpy as np


def cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """(N,) per-text cosine of (N, D) rows."""
    return (ref * got).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-12)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Set-level signal-to-quantisation-noise ratio in dB over all rows together (inf when equal)."""
    noise = float(np.linalg.norm((ref - got).astype(np.float64)))
    if not np.isfinite(noise):
        return float("nan")
    signal = float(np.linalg.norm(ref.astype(np.float64)))
    return float("inf") if noise == 0 else 20.0 * math.log10(max(signal, 1e-30) / noise)


def parity(ref: np.ndarray, got: np.ndarray) -> dict:
    """The parity record of (N, D) engine rows ``got`` against reference rows ``ref``: n, finite, cosine
    mean / min, max-abs, set-level SQNR (NaN where either side is not finite)."""
    finite = bool(np.isfinite(got).all() and np.isfinite(ref).all())
    cos = cosines(ref, got)
    return {"n": int(len(ref)), "finite": finite, "cos_mean": float(np.mean(cos)) if finite else float("nan"),
            "cos_min": float(np.min(cos)) if finite else float("nan"),
            "max_abs": float(np.max(np.abs(ref - got))) if finite else float("nan"),
            "sqnr_db": sqnr_db(ref, got) if finite else float("nan")}


def cos_to_db(cos: float) -> float:
    """The SQNR of one unit row at cosine ``cos``: -10 log10(2 (1 - cos))."""
    err = 2.0 * (1.0 - cos)
    return float("inf") if err <= 0 else -10.0 * math.log10(err)


def thresholds(cfg) -> dict:
    """The gates of ``cfg.precision`` (a ``CompileConfig``), None where a gate is off."""
    if cfg.precision == "int8":
        out = {"cos_min": cfg.int8_cos_min, "sqnr_db": cfg.int8_sqnr_db, "max_abs": None}
    else:
        out = {"cos_min": cfg.fp32_cos_min, "sqnr_db": None, "max_abs": cfg.fp32_max_abs}
    out["ndcg_rel_loss"] = cfg.max_ndcg_rel_loss
    return out


def gate_problems(res: dict, thr: dict) -> list[str]:
    """What fails in a parity record ``res`` (keys of ``parity`` + nDCG) against ``thr`` (``thresholds``);
    each entry names the measured value and the threshold."""
    if not res.get("finite", True):
        return ["non-finite embeddings"]
    out = []
    if res["cos_min"] < thr["cos_min"]:
        out.append(f"cosine min {res['cos_min']:.7f} < {thr['cos_min']} (mean {res['cos_mean']:.7f})")
    if thr.get("max_abs") is not None and res["max_abs"] > thr["max_abs"]:
        out.append(f"max-abs {res['max_abs']:.3g} > {thr['max_abs']:g}")
    if thr.get("sqnr_db") is not None and res["sqnr_db"] < thr["sqnr_db"]:
        out.append(f"SQNR {res['sqnr_db']:.2f} dB < {thr['sqnr_db']} dB")
    loss = res.get("ndcg@10_rel_loss")
    if thr.get("ndcg_rel_loss") is not None and loss is not None and loss > thr["ndcg_rel_loss"]:
        out.append(f"nDCG@10 loss {100 * loss:.2f}% of PyTorch's {res['ndcg@10_pytorch']:.4f} "
                   f"(engine {res['ndcg@10_engine']:.4f}) > {100 * thr['ndcg_rel_loss']:g}%")
    return out


def ndcg_rel_loss(pytorch: float, engine: float) -> float:
    """(PyTorch - engine) / PyTorch: the relative nDCG@10 loss (negative: the engine scored higher)."""
    return (pytorch - engine) / pytorch if pytorch > 0 else 0.0


# ------------------------------------------------------------------------------ INT8 probe gate


def probe_gate(ref: np.ndarray, got: np.ndarray, n_first: int, *, cos_min: float, sqnr: float | None) -> dict:
    """Does a candidate INT8 graph pass on the probe set, with a margin measured on the probe set only?

    The probe set is two halves of disjoint source-package groups (rows ``[:n_first]`` and
    ``[n_first:]``). The margin is how much each gate's value moved between the two halves: a
    disjoint text set of the same kind (verification) may differ from the probe by as much. In dB
    (worst-text SQNR ``cos_to_db(cos min)`` and set SQNR), so one unit serves both gates:

        score = min(worst_db - |worst_db(A) - worst_db(B)| - cos_to_db(cos_min),
                    sqnr_db  - |sqnr_db(A)  - sqnr_db(B)|  - sqnr)          pass iff score >= 0

    No number from the verification set enters (verification stays an independent check).
    """
    if not np.isfinite(got).all():
        return {"score_db": float("-inf"), "passed": False, "cos_min": float("-inf")}
    c = cosines(ref, got)
    halves = [slice(0, n_first), slice(n_first, len(ref))] if 0 < n_first < len(ref) else [slice(0, len(ref))] * 2
    worst = [cos_to_db(float(c[h].min())) for h in halves]
    sets = [sqnr_db(ref[h], got[h]) for h in halves]
    w_all, s_all = cos_to_db(float(c.min())), sqnr_db(ref, got)

    def gap(a, b):
        return 0.0 if math.isinf(a) and math.isinf(b) else abs(a - b)

    score = w_all - gap(*worst) - cos_to_db(cos_min)
    if sqnr is not None:
        score = min(score, s_all - gap(*sets) - sqnr)
    out = {"cos_min": float(c.min()), "cos_min_halves": [float(c[h].min()) for h in halves],
           "sqnr_db": s_all, "sqnr_db_halves": sets, "margin_worst_db": gap(*worst), "margin_sqnr_db": gap(*sets),
           "score_db": score, "passed": bool(score >= 0)}
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else
                [round(x, 6) if math.isfinite(x) else x for x in v] if isinstance(v, list) else v)
            for k, v in out.items()}
