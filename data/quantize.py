"""Compact embeddings to ship: scalar int8 / uint8 and packed binary codes, and search over them.

numpy only (no torch): the torch-free runtime (``moe2edge embed --engine``) quantises with it too.

    ranges = calibration_ranges(corpus_emb)                 # (2, D): per-dimension min / max
    d = quantize(corpus_emb, "int8", ranges=ranges)          # (N, D) int8
    q = quantize(query_emb, "int8", ranges=ranges)           # the SAME ranges: queries and corpus alike
    b = quantize(corpus_emb, "ubinary")                      # (N, ceil(D/8)) uint8, np.packbits order

Semantics follow sentence-transformers' ``quantize_embeddings`` (5.3; equality tested where it applies):

* ``int8`` / ``uint8``: ``steps = (max - min) / 255``; code = ``((x - min) / steps - 128)`` cast to int8
  (uint8: no ``- 128``). The cast truncates toward zero, as ST's ``astype`` does. Two deliberate
  differences, both where ST's result is undefined: values outside the ranges (a query quantised with the
  corpus's ranges) are clipped to the code range first (ST's float->int cast of an out-of-range value is
  undefined behaviour in C and wraps on x86), and a dimension with max == min gets code 0 offset (ST
  divides by zero).
* ``ubinary``: bit = ``x > 0``, packed big-endian per row (``np.packbits(..., axis=-1)``, the first
  dimension is the high bit of byte 0); ``binary``: the same bytes minus 128 as int8. ST packs the
  flattened array and reshapes, which equals packing per row when D % 8 == 0; for other D it would mix
  rows, so each row is padded with zero bits here.

Scores (higher is better):

* ``float32``: inner product; ``int8`` / ``uint8``: by default the inner product of the dequantised
  values (``min + (code + offset) * step``, both sides), or with ``int8_scoring="codes"`` the inner
  product of the raw integer codes as ST's usearch search ranks them (computed in float64: every
  product and partial sum is an integer below 2^53, so it is exact) — see ``scores`` for why the
  default differs;
* ``binary`` / ``ubinary``: the number of equal bits (= bits - Hamming distance; popcount of XOR).
* rescoring (ST's "binary + rescore" recipe): the top candidates of the quantised search are re-ranked
  by the float query against their codes (binary codes unpacked to 0/1; int8 codes dequantised, or as
  integers with ``int8_scoring="codes"``).

Dimension legend: N documents, Q queries, D embedding dim, B bytes per packed row (ceil(D / 8)).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
SCALAR = ("int8", "uint8")  # need calibration ranges
BINARY = ("binary", "ubinary")
_CODE_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}
_OFFSET = {"int8": 128.0, "uint8": 0.0}
MIN_CALIBRATION = 100  # ST warns below this many embeddings
INT8_SCORING = ("dequantized", "codes")  # how int8/uint8 codes are compared (see ``scores``)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def _float2d(emb, what: str = "embeddings") -> np.ndarray:
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (N, D) array, got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"{what} to quantise must be float, got {emb.dtype} (already quantised?)")
    return emb


# ------------------------------------------------------------------------------------- ranges


def calibration_ranges(calibration) -> np.ndarray:
    """(2, D) float32: per-dimension min (row 0) and max (row 1) of the calibration embeddings."""
    cal = _float2d(calibration, "calibration embeddings")
    if cal.shape[0] == 0:
        raise ValueError("cannot calibrate int8 ranges on 0 embeddings")
    if cal.shape[0] < MIN_CALIBRATION:
        log.warning("int8 ranges from only %d embeddings: quantisation is more stable with ranges from more "
                    "(e.g. the corpus), reused for the queries", cal.shape[0])
    return np.vstack((cal.min(axis=0), cal.max(axis=0))).astype(np.float32)


def check_ranges(ranges, dim: int | None = None, *, where: str = "ranges") -> np.ndarray:
    """Validate a (2, D) ranges array (row 0 min, row 1 max, finite, min <= max)."""
    r = np.asarray(ranges)
    if r.ndim != 2 or r.shape[0] != 2:
        raise ValueError(f"{where}: ranges must have shape (2, D) (row 0 min, row 1 max), got {r.shape}")
    if not np.issubdtype(r.dtype, np.floating):
        raise ValueError(f"{where}: ranges must be float, got {r.dtype}")
    if dim is not None and r.shape[1] != dim:
        raise ValueError(f"{where}: ranges are for {r.shape[1]}-d embeddings, these are {dim}-d "
                         "(same model and --dim as the corpus?)")
    if not np.isfinite(r).all():
        raise ValueError(f"{where}: ranges contain NaN or inf")
    if (r[0] > r[1]).any():
        raise ValueError(f"{where}: min > max in {int((r[0] > r[1]).sum())} dimensions (rows swapped?)")
    return r


def save_ranges(path: str | Path, ranges: np.ndarray) -> Path:
    """Write ranges as a .npy (loadable by ``np.load`` and usable as ST's ``ranges=``), atomically."""
    from moe2edge._io import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, check_ranges(ranges).astype(np.float32))
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_ranges(path: str | Path, dim: int | None = None) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ranges file not found (written beside the corpus embeddings by "
                                "`moe2edge embed --precision int8`)")
    try:
        r = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a .npy ranges file ({e})") from None
    return check_ranges(r, dim, where=str(path))


def default_ranges_path(output: str | Path) -> Path:
    """``corpus.npy`` -> ``corpus.ranges.npy`` (beside the codes)."""
    output = Path(output)
    stem = output.name[:-4] if output.name.endswith(".npy") else output.name
    return output.with_name(stem + ".ranges.npy")


# ------------------------------------------------------------------------------------ quantise


def quantize(embeddings, precision: str, *, ranges: np.ndarray | None = None) -> np.ndarray:
    """Float (N, D) embeddings -> codes of ``precision`` (see the module docstring for the exact rules).

    ``int8`` / ``uint8`` take ``ranges`` (2, D); without them the ranges come from ``embeddings`` itself
    (ST's fallback; fine for a corpus, wrong for queries: reuse the corpus's ranges for those).
    """
    check_precision(precision)
    emb = _float2d(embeddings)
    if precision == "float32":
        return emb.astype(np.float32)
    if precision in BINARY:
        packed = np.packbits(emb > 0, axis=-1)  # (N, B) uint8, big-endian bit order per row
        return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    r = check_ranges(calibration_ranges(emb) if ranges is None else ranges, emb.shape[1])
    # ST's arithmetic in ST's dtypes (float32 embeddings and ranges -> float32): the cast truncates, so
    # computing in float64 instead would move values that land a hair below an integer to the next code.
    starts = r[0]
    steps = (r[1] - r[0]) / 255
    lo, hi = _CODE_RANGE[precision]
    with np.errstate(divide="ignore", invalid="ignore"):
        x = (emb - starts) / steps - _OFFSET[precision]  # (N, D) the code before the cast
    x = np.where(steps > 0, x, x.dtype.type(lo))  # constant dimension: one code (ST would divide by zero)
    outside = int(((x < lo) | (x > hi)).sum())
    if outside:
        log.info("%d of %d values outside the calibration ranges: clipped to [%d, %d]", outside, x.size, lo, hi)
    return np.clip(x, lo, hi).astype(np.int8 if precision == "int8" else np.uint8)  # cast truncates toward 0


def unpack_bits(codes: np.ndarray, dim: int) -> np.ndarray:
    """Packed binary codes (N, B) (ubinary uint8 or binary int8) -> (N, dim) uint8 bits 0/1."""
    return np.unpackbits(_as_ubinary(codes), axis=-1, count=dim)


def _as_ubinary(codes: np.ndarray) -> np.ndarray:
    if codes.dtype == np.int8:  # binary = ubinary - 128: same bits with the top one flipped
        return (codes.astype(np.int16) + 128).astype(np.uint8)
    return codes


def code_bytes(n: int, dim: int, precision: str) -> int:
    """Bytes of an index of ``n`` embeddings of ``dim`` dimensions (codes only; int8 ranges add 8·D)."""
    check_precision(precision)
    per = {"float32": 4 * dim, "int8": dim, "uint8": dim}.get(precision, (dim + 7) // 8)
    return n * per


# -------------------------------------------------------------------------------------- search


def dequantize(codes: np.ndarray, precision: str, ranges: np.ndarray) -> np.ndarray:
    """int8 / uint8 codes -> the values they stand for, ``min + (code + offset) * step`` (float64): within
    one step of the original value (the cast truncates toward zero)."""
    r = check_ranges(ranges, codes.shape[-1])
    step = (r[1].astype(np.float64) - r[0]) / 255
    return r[0] + (codes.astype(np.float64) + _OFFSET[precision]) * step


def scores(q_codes: np.ndarray, d_codes: np.ndarray, precision: str, *, ranges: np.ndarray | None = None,
           int8_scoring: str = "dequantized") -> np.ndarray:
    """(Q, N) similarity of quantised queries to quantised documents (higher is better).

    int8 / uint8: ``"dequantized"`` (default) = inner product of the values the codes stand for, written
    as ``q_hat . a + (q_hat * step) . code_d`` (a = min + offset * step): one float-weighted pass over the
    integer corpus codes, the same cost as a code dot product; ``"codes"`` = inner product of the raw
    codes, as sentence-transformers' usearch search (``ip`` on ``i8``) ranks them. The raw code dot
    centres every dimension on its range midpoint and weights it by 1 / step^2, which is not the
    embedding geometry: measured on the MoE teacher it costs 4.5% of nDCG@10, dequantised 0% (docs/benchmarks.md).
    """
    check_precision(precision)
    if q_codes.shape[1:] != d_codes.shape[1:]:
        raise ValueError(f"query codes {q_codes.shape} and document codes {d_codes.shape} differ in width")
    if precision == "float32":
        return q_codes.astype(np.float32) @ d_codes.astype(np.float32).T
    if precision in SCALAR:
        if int8_scoring not in INT8_SCORING:
            raise ValueError(f"int8_scoring must be one of {', '.join(INT8_SCORING)}, got {int8_scoring!r}")
        if int8_scoring == "codes":
            return q_codes.astype(np.float64) @ d_codes.astype(np.float64).T  # exact: integers < 2^53
        if ranges is None:
            raise ValueError("dequantized int8 scoring needs the ranges")
        return _dequantized_dot(dequantize(q_codes, precision, ranges), d_codes, precision, ranges)
    qb, db = _as_ubinary(q_codes), _as_ubinary(d_codes)
    nbits = 8 * qb.shape[1]
    ham = np.bitwise_count(qb[:, None, :] ^ db[None, :, :]).sum(-1, dtype=np.int64)  # (Q, N) Hamming
    return (nbits - ham).astype(np.float64)  # equal bits (zero padding bits agree: a constant)


def _dequantized_dot(q: np.ndarray, d_codes: np.ndarray, precision: str, ranges: np.ndarray) -> np.ndarray:
    """q (Q, D) float . dequantize(d_codes) without materialising the float corpus -> (Q, N)."""
    r = ranges.astype(np.float64)
    step = (r[1] - r[0]) / 255
    a = r[0] + _OFFSET[precision] * step  # (D,): the value of code 0
    return (q @ a)[:, None] + (q * step) @ d_codes.astype(np.float64).T


def rescore_scores(q_float: np.ndarray, cand_codes: np.ndarray, precision: str, dim: int, *,
                   ranges: np.ndarray | None = None, int8_scoring: str = "dequantized") -> np.ndarray:
    """Float query (Q, D) against candidate codes (Q, C, B|D) -> (Q, C). ST's recipe: binary codes
    unpacked to 0/1, int8 codes as integers (``int8_scoring="codes"``); by default int8 codes are
    dequantised first (the float query against the values the codes stand for)."""
    q = q_float.astype(np.float64)
    if precision in BINARY:
        c = np.unpackbits(_as_ubinary(cand_codes), axis=-1, count=dim)  # (Q, C, D) 0/1
    elif precision in SCALAR and int8_scoring == "dequantized":
        c = dequantize(cand_codes, precision, ranges)  # (Q, C, D)
    else:
        c = cand_codes
    return np.einsum("qd,qcd->qc", q, c.astype(np.float64))


def _order(s: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Row-wise indices by score descending, ties by ``tiebreak`` descending (trec_eval's doc id order)."""
    return np.lexsort((-np.broadcast_to(tiebreak, s.shape), -s), axis=-1)


def search(q_float: np.ndarray, d_codes: np.ndarray, precision: str, k: int, *, ranges: np.ndarray | None = None,
           rescore: int = 0, rescore_with: tuple | None = None, tiebreak: np.ndarray | None = None,
           int8_scoring: str = "dequantized", chunk: int = 256) -> np.ndarray:
    """Top-``k`` document indices (Q, k') of an index of ``d_codes``, k' = min(k, N).

    The float queries are quantised like the corpus (``ranges``: the corpus's, for int8/uint8). With
    ``rescore = C > 0`` the top C candidates of the quantised ranking are re-ranked by the float query
    against their codes and placed first; positions C+1.. keep the quantised order. ``rescore_with =
    (codes, precision, ranges)`` rescores against other codes of the same corpus instead, e.g. int8
    codes kept on disk beside an in-memory binary index (sentence-transformers' binary + int8 demo).
    ``int8_scoring``: see ``scores``. Ties (binary
    scores are integers) fall to ``tiebreak`` descending (default: index), the order trec_eval would use.
    """
    check_precision(precision)
    q_float = _float2d(q_float, "query embeddings")
    n = d_codes.shape[0]
    k = min(k, n)
    tiebreak = np.arange(n) if tiebreak is None else np.asarray(tiebreak)
    if precision in SCALAR and ranges is None:
        raise ValueError(f"{precision} search needs the corpus's ranges (queries must be quantised alike)")
    q_codes = quantize(q_float, precision, ranges=ranges)
    dim = q_float.shape[1]
    r_codes, r_prec, r_ranges = rescore_with or (d_codes, precision, ranges)
    if r_codes.shape[0] != n:
        raise ValueError(f"rescore codes cover {r_codes.shape[0]} documents, the index {n}")
    out = np.zeros((q_float.shape[0], k), dtype=np.int64)
    if k == 0:
        return out
    for s in range(0, q_float.shape[0], chunk):
        sc = scores(q_codes[s:s + chunk], d_codes, precision, ranges=ranges, int8_scoring=int8_scoring)  # (C, N)
        order = _order(sc, tiebreak)  # (C, N)
        if rescore and precision != "float32":
            c = min(rescore, n)
            cand = order[:, :c]  # (C, c)
            rs = rescore_scores(q_float[s:s + chunk], r_codes[cand], r_prec, dim, ranges=r_ranges,
                                int8_scoring=int8_scoring)  # (C, c)
            reo = _order(rs, tiebreak[cand])
            order = np.concatenate([np.take_along_axis(cand, reo, axis=1), order[:, c:]], axis=1)
        out[s:s + chunk] = order[:, :k]
    return out


__all__ = ["PRECISIONS", "quantize", "calibration_ranges", "check_ranges", "save_ranges", "load_ranges",
           "default_ranges_path", "dequantize", "unpack_bits", "code_bytes", "scores", "rescore_scores", "search",
           "INT8_SCORING"]
