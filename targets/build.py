"""Compile = export -> (quantize) -> write the engine folder -> verify on real text -> manifest.

``compile_engine`` is the one stage API (keyword-typed, returns the manifest). It builds in a
temporary sibling folder and renames it into place only after verification passed
(``moe2edge._io.atomic_dir``): a failure at any step leaves no half-built output (and an older
folder at ``out_dir`` untouched).

Verification runs the finished folder through the same runtime users get
(``moe2edge.targets.runtime.load_engine``) on real text and compares with the PyTorch model in fp32:
per-text cosine (mean / min over every text and every batch shape tried), max-abs difference, and
nDCG@10 on a small retrieval set (short package description as the query, its long description
as the document), set-level SQNR. Below a gate of ``targets/gates.py`` (fp32: cos min >= 0.99999 and
max-abs <= 1e-5; INT8: cos min >= 0.99 and SQNR >= 20 dB; both: nDCG@10 loss <= 0.5 % relative) ->
``VerificationError`` naming the measured numbers and the thresholds.

The manifest's ``identity`` block (source checkpoint hash, target, precision, settings, quantiser
settings, calibration / verification data hashes, versions, file hashes) carries no timestamp or
timing: the same inputs give the same ``identity_sha256`` (tested).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from moe2edge._io import atomic_dir, sha256_file, texts_sha256
from moe2edge._text import check_text_pairs
from moe2edge.targets.base import (
    Artifact, CalibrationError, CompileConfig, Sample, TargetError, TargetUnavailableError, VerificationError, get,
)
from moe2edge.targets.gates import gate_problems, ndcg_rel_loss, parity, thresholds
from moe2edge.targets.runtime import ENGINE_FILE, ENGINE_FORMAT, Tokenizer, encode_batches, load_engine

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "moe2edge.manifest/v1"
VERSION_MODULES = ("moe2edge", "torch", "numpy", "tokenizers", "onnx", "onnxscript", "onnxruntime", "openvino",
                   "nncf", "tensorrt")


# ------------------------------------------------------------------------------ text inputs


def read_texts(path: str | Path) -> list[str]:
    """Calibration / verification texts from a file: one text per line (UTF-8), or JSONL whose objects
    carry ``text`` (or ``query`` / ``document`` / ``positive`` / ``anchor``; every such field is used)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CalibrationError(f"{path}: not valid UTF-8 at line {line} (byte {e.start})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    is_jsonl = path.suffix in (".jsonl", ".json") or (lines and lines[0].lstrip().startswith("{"))
    if not is_jsonl:
        return [ln.strip() for ln in lines]
    out = []
    for i, ln in enumerate(lines, 1):
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise CalibrationError(f"{path}:{i}: expected a JSON object per line")
        keys = [k for k in ("text", "query", "document", "positive", "anchor") if k in obj]
        bad = [k for k in keys if not isinstance(obj[k], str)]
        if bad:
            raise CalibrationError(f"{path}:{i}: field {bad[0]!r} must be a string, got {type(obj[bad[0]]).__name__}")
        found = [obj[k] for k in keys]
        if not found:
            raise CalibrationError(f"{path}:{i}: no text field (text / query / document / positive / anchor)")
        out.extend(t for t in found if t.strip())
    return out


def calibration_batches(texts: list[str], tok: Tokenizer, cfg: CompileConfig) -> tuple[list, dict]:
    """Tokenised calibration batches; raises ``CalibrationError`` when there is too little text."""
    if texts is None:
        raise CalibrationError("INT8 needs calibration data: pass --calibration FILE (one text per line, or JSONL), "
                               "or --calibration dpkg for this machine's package descriptions")
    texts = [t for t in texts if t.strip()]
    n_tok = sum(tok.count_tokens(texts)) if texts else 0
    if len(texts) < cfg.min_calibration_texts or n_tok < cfg.min_calibration_tokens:
        raise CalibrationError(
            f"calibration text too short: {len(texts)} texts / {n_tok} tokens; need >= {cfg.min_calibration_texts} "
            f"texts and >= {cfg.min_calibration_tokens} tokens of real text (activation ranges and every expert "
            "need to be seen)")
    bs = cfg.calibration_batch_size
    batches = [tok(texts[s : s + bs])[:2] for s in range(0, len(texts), bs)]
    return batches, {"sha256": texts_sha256(texts), "texts": len(texts), "tokens": int(n_tok), "batch_size": bs}


class TextOverlapError(CalibrationError):
    """Verification, calibration or probe texts duplicate each other (exactly or nearly)."""


def text_sets(verify_pairs: list[tuple[str, str]], calibration: list[str], probe, *, allow_overlap: bool,
              seed: int = 13) -> tuple[list[str], tuple[list[str], list[str]], dict]:
    """(calibration texts, probe halves, report): the three INT8 text sets, checked to be disjoint.

    ``probe``: two lists (halves of disjoint package groups, as ``data/installed.installed_text_sets``
    gives), one list (split in halves by near-duplicate group here), or None (carved out of
    ``calibration``: a third of its near-duplicate groups). Every pair of sets is checked for exact and
    near-duplicate overlap (``data/textsets.overlap``); any -> ``TextOverlapError`` with the counts, unless
    ``allow_overlap`` (then the counts are only recorded)."""
    from moe2edge.data.textsets import overlap, split_texts

    calibration = [t for t in calibration if t.strip()]
    report: dict = {}
    if probe is None:
        parts = split_texts(calibration, {"calibration": 2, "probe": 1}, seed=seed)
        calibration, probe = parts["calibration"], parts["probe"]
        report["probe_from"] = "a third of the calibration texts' near-duplicate groups"
    if probe and isinstance(probe[0], str):
        halves = split_texts(list(probe), {"a": 1, "b": 1}, seed=seed)
        probe = (halves["a"], halves["b"])
    probe = ([t for t in probe[0] if t.strip()], [t for t in probe[1] if t.strip()])
    verify = [t for p in verify_pairs for t in p]
    ov = {"calibration_vs_verification": overlap(calibration, verify),
          "probe_vs_verification": overlap(probe[0] + probe[1], verify),
          "calibration_vs_probe": overlap(calibration, probe[0] + probe[1])}
    report.update(calibration_texts=len(calibration), probe_texts=[len(probe[0]), len(probe[1])], overlap=ov,
                  allow_overlap=allow_overlap)
    bad = {k: v for k, v in ov.items() if v["exact"] or v["near_duplicate"]}
    if bad and not allow_overlap:
        what = "; ".join(f"{k.replace('_vs_', ' vs ')}: {v['exact']} exact + {v['near_duplicate']} near-duplicate "
                         f"of {v['texts']} texts" for k, v in bad.items())
        raise TextOverlapError(f"text sets overlap ({what}): verification would not be independent of what "
                               "the INT8 graph was calibrated and searched on. Use texts of other packages, or "
                               "pass --allow-overlap to compile anyway (the counts go into the manifest)")
    if bad:
        log.warning("text sets overlap (allowed): %s", bad)
    if not probe[0] or not probe[1]:
        raise CalibrationError(f"the INT8 fallback probe needs two non-empty halves, got {len(probe[0])} + "
                               f"{len(probe[1])} texts: give more (and more varied) calibration text")
    return calibration, probe, report


# ------------------------------------------------------------------------------ parity


def ndcg10_diagonal(q: np.ndarray, d: np.ndarray) -> float:
    """nDCG@10 where query i's only relevant document is document i (exact search, unit vectors)."""
    if len(q) == 0:
        return float("nan")
    s = q @ d.T  # (N, N)
    own = np.diag(s)[:, None]
    rank = (s > own).sum(1)  # 0-based rank of the own document (ties in its favour)
    return float(np.mean(np.where(rank < 10, 1.0 / np.log2(rank + 2), 0.0)))


def _rounded(res: dict) -> dict:
    """7 decimals for the JSON record; max-abs keeps 3 significant digits (fp32 engines measure ~1e-7)."""
    def r(k, v):
        if not isinstance(v, float) or not math.isfinite(v):
            return v
        return float(f"{v:.3g}") if k == "max_abs" else round(v, 7)
    return {k: r(k, v) for k, v in res.items()}


def near_tie_parity(ref: np.ndarray, got: np.ndarray, near: np.ndarray, margin: np.ndarray, *, n_pairs: int,
                    cfg: CompileConfig) -> tuple[dict, np.ndarray]:
    """Parity of the verification rows with router near-ties accounted for -> (record, pair mask for nDCG).

    ``near``: near-tie tokens per row (``routing.RouterTap``), ``margin``: each row's smallest top-k margin;
    rows ``[:n_pairs]`` are the queries, ``[n_pairs:2 n_pairs]`` their documents. fp32: the gated numbers
    (top level) are those of the rows without a near-tie; ``all_texts`` and ``near_tie_texts`` carry the
    others (an expert flipped by a near-tie is legitimate, a wrong kernel moves every text). Fewer than
    ``cfg.near_tie_min_clean`` clean rows -> a problem (too little left to verify). INT8: every row is gated."""
    tied = near > 0
    info = {"eps": cfg.near_tie_eps, "tokens": int(near.sum()), "texts": int(tied.sum()), "rows": int(len(near)),
            "min_margin": float(np.min(margin)) if len(margin) and np.isfinite(margin).any() else None}
    pair_ok = np.ones(n_pairs, bool)
    if cfg.precision != "fp32" or not tied.any():
        res = parity(ref, got)
        res["near_tie"] = {**info, "gated_on": "every text"}
        return res, pair_ok
    clean = ~tied
    res = parity(ref[clean], got[clean])
    res["all_texts"] = parity(ref, got)
    res["near_tie_texts"] = parity(ref[tied], got[tied])
    pair_ok = clean[:n_pairs] & clean[n_pairs : 2 * n_pairs]
    res["near_tie"] = {**info, "gated_on": "texts without a near-tie token", "pairs_for_ndcg": int(pair_ok.sum())}
    if clean.sum() < cfg.near_tie_min_clean * len(near):
        res["_problems"] = [f"only {int(clean.sum())} of {len(near)} texts have no router near-tie (a top-k margin "
                            f"< {cfg.near_tie_eps:g} in the PyTorch reference; {int(near.sum())} tokens): too few to "
                            f"verify fp32 (need {100 * cfg.near_tie_min_clean:g}%); verify with more texts"]
    return res, pair_ok


def verify_engine(engine_dir: Path, model, tok: Tokenizer, pairs: list[tuple[str, str]], *, prompts: dict,
                  dim: int, cfg: CompileConfig) -> dict:
    """Run the finished folder's engine and the PyTorch model on real text; raise below threshold."""
    import torch

    from moe2edge.targets.torch_export import reference_embeddings

    queries, docs = [p[0] for p in pairs], [p[1] for p in pairs]
    qp, dp = prompts.get("search_query", ""), prompts.get("search_document", "")
    full = model.config.hidden_size

    def torch_run(ids, mask):
        return reference_embeddings(model, [(ids, mask)], dim=None if dim == full else dim)

    from moe2edge.targets.routing import RouterTap

    few = list(range(min(4, len(docs))))  # batch 1 (no padding)
    mixed = [queries[i] if i % 2 else docs[i] for i in range(min(16, len(docs)))]  # one mixed short + long batch
    t0 = time.perf_counter()
    # The PyTorch reference first (and its router near-ties), before the engine is opened: one model in memory
    # at a time at the peak.
    tap = RouterTap(model, eps=cfg.near_tie_eps)
    with torch.no_grad(), tap:
        ref_q = encode_batches(tap.wrap(torch_run), tok, queries, prefix=qp, dim=dim, full_dim=dim, batch_size=32)
        nt_q, mg_q = tap.take(queries)
        ref_d = encode_batches(tap.wrap(torch_run), tok, docs, prefix=dp, dim=dim, full_dim=dim, batch_size=32)
        nt_d, mg_d = tap.take(docs)
        ref_m = encode_batches(tap.wrap(torch_run), tok, mixed, prefix="", dim=dim, full_dim=dim,
                               batch_size=len(mixed) or 1)
        nt_m, mg_m = tap.take(mixed)
    engine = load_engine(engine_dir, threads=1, check=False)  # the manifest (file hashes) is written after this
    got_q = engine.encode(queries, prompt="search_query" if qp else None, batch_size=32)
    got_d = engine.encode(docs, prompt="search_document" if dp else None, batch_size=32)
    got_1 = np.concatenate([engine.encode([docs[i]], prompt="search_document" if dp else None, batch_size=1)
                            for i in few]) if few else np.zeros((0, dim), np.float32)
    got_m = engine.encode(mixed, batch_size=len(mixed) or 1)
    del engine
    seconds = time.perf_counter() - t0
    ref_all = np.concatenate([ref_q, ref_d, ref_d[few], ref_m])
    got_all = np.concatenate([got_q, got_d, got_1, got_m])
    near = np.concatenate([nt_q, nt_d, nt_d[few], nt_m])  # near-tie tokens per verification row
    margin = np.concatenate([mg_q, mg_d, mg_d[few], mg_m])
    res, pair_ok = near_tie_parity(ref_all, got_all, near, margin, n_pairs=len(queries), cfg=cfg)
    res["ndcg@10_pytorch"] = ndcg10_diagonal(ref_q[pair_ok], ref_d[pair_ok])
    res["ndcg@10_engine"] = ndcg10_diagonal(got_q[pair_ok], got_d[pair_ok])
    res["ndcg@10_delta"] = res["ndcg@10_engine"] - res["ndcg@10_pytorch"]
    res["ndcg@10_rel_loss"] = ndcg_rel_loss(res["ndcg@10_pytorch"], res["ndcg@10_engine"])
    res.update(threshold_cos_min=cfg.cos_threshold, thresholds=thresholds(cfg), queries=len(queries),
               documents=len(docs), shapes="batch 32 (length-sorted), batch 1, one mixed batch",
               seconds=round(seconds, 2))
    problems = gate_problems(res, res["thresholds"])  # on the unrounded numbers
    problems += res.pop("_problems", [])
    for k in ("all_texts", "near_tie_texts"):
        if isinstance(res.get(k), dict):
            res[k] = _rounded(res[k])
    res = _rounded(res)
    if problems:
        nt = res["near_tie"]
        excl = (f" ({nt['texts']} of {nt['rows']} with a router near-tie reported apart)"
                if "all_texts" in res else "")
        raise VerificationError(f"{cfg.target} {cfg.precision} failed verification against PyTorch fp32 on "
                                f"{res['n']} real texts{excl}: " + "; ".join(problems), res)
    return res


# ------------------------------------------------------------------------------ compile


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for m in VERSION_MODULES:
        try:
            out[m] = md.version(m)
        except md.PackageNotFoundError:
            pass
    return out


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def compile_engine(
    *,
    model,
    tokenizer_file: str | Path,
    out_dir: str | Path,
    cfg: CompileConfig,
    verify_pairs: list[tuple[str, str]],
    calibration_texts: list[str] | None = None,
    probe_texts=None,
    allow_overlap: bool = False,
    text_split: dict | None = None,
    source_hash: str,
    name: str | None = None,
    overwrite: bool = True,
    force: bool = False,
) -> dict:
    """Build, verify and write an engine folder for ``cfg.target``; returns the manifest.

    model: a ``NomicMoE``-family module (eval, fp32) or a static student's ``StaticModel`` (onnx / openvino;
    its INT8 is the weight-only int8 table, no calibration); tokenizer_file: its tokenizer.json;
    verify_pairs: (query, document) real-text pairs; calibration_texts: required for INT8; probe_texts:
    the INT8 fallback's probe (two halves, one list, or None: carved out of the calibration texts), see
    ``text_sets``; allow_overlap: record instead of refuse overlapping text sets; text_split: how the
    caller drew the sets (recorded in the manifest); force: replace an existing ``out_dir`` that is not
    an engine folder this tool wrote (``moe2edge._io.safe_output``).
    """
    t_start = time.perf_counter()
    target = get(cfg.target)
    mcfg = model.config
    from moe2edge.student.static import StaticModel  # here: importing targets.build stays torch-free

    static = isinstance(model, StaticModel)  # a static student: token table + mean pooling, no transformer
    if static and cfg.target == "tensorrt":
        raise TargetError("a static student has no transformer to build a TensorRT engine for; compile it with "
                          "--target onnx or --target openvino (a table lookup + mean runs on any CPU)")
    dim = cfg.dim or mcfg.hidden_size
    if not 1 <= dim <= mcfg.hidden_size:
        raise ValueError(f"dim must be in [1, {mcfg.hidden_size}], got {dim}")
    if not target.is_available() and not getattr(target, "cpu_verifiable", False):
        raise TargetUnavailableError(f"--target {cfg.target}: its runtime is not installed here; "
                                     f"pip install 'moe2edge[{target.runtime_extra}]'")
    if hasattr(target, "require"):
        target.require()
    check_text_pairs(verify_pairs)
    tok = Tokenizer(tokenizer_file, max_length=mcfg.max_seq_length, pad_id=mcfg.pad_token_id)
    model = model.eval()

    calib, calib_info, probe, sets_info = None, None, None, None
    if cfg.precision == "int8" and static:
        calib_info = {"not_needed": "weight-only INT8 (the table); there are no activations to calibrate"}
    elif cfg.precision == "int8":
        if calibration_texts is not None:
            calibration_batches(calibration_texts, tok, cfg)  # too little text: say so before splitting it
            calibration_texts, halves, sets_info = text_sets(verify_pairs, calibration_texts, probe_texts,
                                                             allow_overlap=allow_overlap)
            per_half = max(1, cfg.int8_fallback_probe_batches // 2) * cfg.calibration_batch_size
            halves = [h[:per_half] for h in halves]
            probe = tuple([tok(h[s : s + cfg.calibration_batch_size])[:2]
                           for s in range(0, len(h), cfg.calibration_batch_size)] for h in halves)
            sets_info.update(probe_texts_used=[len(h) for h in halves], probe_sha256=texts_sha256(halves[0] + halves[1]),
                             split=text_split)
        calib, calib_info = calibration_batches(calibration_texts, tok, cfg)
        if mcfg.moe_layers:
            from moe2edge.targets.torch_export import expert_token_counts

            counts = expert_token_counts(model, calib)  # (L, E)
            calib_info["expert_tokens_min"] = int(counts.min())
            starved = [(mcfg.moe_layers[l], e) for l, e in zip(*np.nonzero(counts == 0))]
            if starved:
                raise CalibrationError(f"calibration routes no token to (layer, expert) {starved[:8]}: their INT8 "
                                       "ranges would be guesses; add more (and more varied) calibration text")

    vdata = {"sha256": texts_sha256([t for p in verify_pairs for t in p]), "pairs": len(verify_pairs)}
    sample_ids, sample_mask, _ = tok(["a sample sentence for tracing the graph", "two"])
    sample = Sample(sample_ids, sample_mask)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite, kinds=("engine",), force=force) as tmp, tempfile.TemporaryDirectory(prefix="moe2edge-build-") as work:
        work = Path(work)
        if static and cfg.precision == "int8":
            from moe2edge.student.static import StaticInt8Model

            art = target.export(StaticInt8Model(mcfg, model.embeddings.weight.detach()), sample, work, cfg)
            art = Artifact(art.path, art.target, "int8", {**art.info, "quantizer": {
                "method": "weight-only int8 token table, symmetric, one scale per row (moe2edge StaticInt8Model)"}})
        else:
            log.info("exporting %s (%s) ...", cfg.target, "all-experts" if cfg.all_experts else "sparse")
            art = target.export(model, sample, work, cfg)
            if cfg.precision == "int8":
                log.info("quantising to INT8 (calibration %d batches) ...", len(calib))
                art = target.quantize(art, calib, cfg, probe=probe)
        files = dict(target.finalize(art, tmp, cfg))  # {"model_file": ..., other engine.json keys}
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        spec = {
            "format": ENGINE_FORMAT, "target": cfg.target, "precision": cfg.precision,
            "runtime": target.runtime, "model_file": files.pop("model_file"), "input_names": ["input_ids", "attention_mask"], "output_name": "sentence_embedding",
            "dim": dim, "hidden_size": mcfg.hidden_size, "max_seq_length": mcfg.max_seq_length,
            "pad_token_id": mcfg.pad_token_id, "prompts": dict(mcfg.prompts), "tokenizer": "tokenizer.json",
            "vocab_size": mcfg.vocab_size,
        }
        spec.update(files)
        if name:  # not the folder name by default: the same inputs must give the same files wherever written
            spec["name"] = name
        if cfg.target == "openvino":
            spec["ov_precision_hint"] = cfg.ov_precision_hint
        (tmp / ENGINE_FILE).write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        log.info("verifying the engine folder against PyTorch fp32 on %d pairs ...", len(verify_pairs))
        measured = verify_engine(tmp, model, tok, verify_pairs, prompts=dict(mcfg.prompts), dim=dim, cfg=cfg)
        if hasattr(target, "bundle_verification"):  # TensorRT: inputs + references for the plan's own check
            with __import__("torch").no_grad():
                art.info["plan_verification"] = target.bundle_verification(
                    tmp, model, tok, verify_pairs, cfg, dim, measured["thresholds"])
        file_hashes = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
                       if p.is_file() and p.name != "manifest.json"}
        file_bytes = {rel: (tmp / rel).stat().st_size for rel in file_hashes}  # checked at load (moe2edge._integrity)
        identity = {
            "source": {"checkpoint_sha256": source_hash,
                       "model_type": "static" if static else "moe" if mcfg.moe_layers else "dense",
                       "hidden_size": mcfg.hidden_size, "num_layers": getattr(mcfg, "num_layers", 0),
                       "num_experts": mcfg.num_experts if mcfg.moe_layers else 0,
                       "top_k": getattr(mcfg, "moe_top_k", 0)},
            "target": cfg.target, "precision": cfg.precision, "dim": dim, "config": cfg.to_dict(),
            "artifact": art.info, "calibration": calib_info, "text_sets": sets_info, "verification_data": vdata,
            "versions": versions(), "files": file_hashes, "file_bytes": file_bytes,
        }
        manifest = {
            "schema": MANIFEST_SCHEMA, "identity": identity, "identity_sha256": _hash(identity),
            "parity": measured,
            # Not hashed: when, where and how long.
            "build": {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "seconds": round(time.perf_counter() - t_start, 1), "host": platform.node()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    nt = measured.get("near_tie") or {}
    log.info("built %s: %s %s, cos mean %.6f / min %.6f, max-abs %.2g, SQNR %.1f dB, nDCG@10 delta %+.4f; router "
             "near-ties: %s tokens in %s of %s texts", out_dir, cfg.target, cfg.precision, measured["cos_mean"],
             measured["cos_min"], measured["max_abs"], measured["sqnr_db"], measured["ndcg@10_delta"],
             nt.get("tokens", "-"), nt.get("texts", "-"), nt.get("rows", "-"))
    return manifest
