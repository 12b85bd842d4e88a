"""Compile every target x precision for MoE teachers and MiniLM dense, then benchmark.

    .venv/bin/python bench/targets.py --work runs/targets [--teacher DIR] [--models ...] [--variants ...]
                                      [--skip-bench]

Models: ``minilm-moe`` = the trained MoE teacher at ``--teacher`` (default: the 60-step MiniLM MoE
teacher, /work/shared-runs/minilm-moe/final) -- or, without one, MiniLM freshly upcycled (experts =
copies: a weak parity fixture); ``minilm-moe-distinct`` = the same with its experts made distinct
and its router sharpened (``teacher.upcycling.diversify_experts``); ``minilm-dense``. Text: this
machine's package descriptions split into verification / calibration / probe sets of disjoint
source-package groups (``data/installed.installed_text_sets``). Writes runs/targets/{ckpt-*,engines/*},
results.json (expert diversity per model, the text split, parity + gates per engine, sparse vs
all-experts FLOPs, benchmark) and prints the INT8 table. Failures (a variant below a gate) are
recorded, not fatal.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("bench.targets")

VARIANTS = [  # (name, CompileConfig kwargs)
    ("onnx-fp32", {"target": "onnx"}),
    ("onnx-int8-dynamic", {"target": "onnx", "precision": "int8", "ort_quant": "dynamic"}),
    ("onnx-int8-static", {"target": "onnx", "precision": "int8", "ort_quant": "static"}),
    ("openvino-fp32", {"target": "openvino"}),
    ("openvino-int8", {"target": "openvino", "precision": "int8"}),
    ("tensorrt-int8-qdq", {"target": "tensorrt", "precision": "int8"}),
]


DEFAULT_TEACHER = "/work/shared-runs/minilm-moe/final"


def checkpoints(work: Path, teacher: str | None) -> dict[str, Path]:
    import torch

    from moe2edge.teacher import load_embedder, minilm_path, upcycle
    from moe2edge.teacher.embedder import Embedder
    from moe2edge.teacher.upcycling import diversify_experts

    torch.manual_seed(0)
    if teacher and (Path(teacher) / "config.json").exists():
        moe_dir = Path(teacher)
    else:
        log.warning("no trained teacher at %s: using MiniLM freshly upcycled (identical experts)", teacher)
        moe_dir = work / "ckpt-minilm-moe"
        if not (moe_dir / "config.json").exists():
            dense = load_embedder(minilm_path())
            Embedder(upcycle(dense.model), dense.tokenizer).save(moe_dir)
    distinct = work / "ckpt-minilm-moe-distinct"
    if not (distinct / "config.json").exists():
        emb = load_embedder(moe_dir)
        Embedder(diversify_experts(emb.model.eval()), emb.tokenizer).save(distinct)
    return {"minilm-moe": moe_dir, "minilm-moe-distinct": distinct, "minilm-dense": Path(minilm_path())}


def int8_table(results: dict) -> str:
    """The INT8 rows as Markdown: gates, the fallback's probe numbers, verification numbers."""
    head = ("| model | variant | probe all-INT8 cos min / SQNR | kept float | probe final cos min / SQNR (halves' "
            "margin dB) | verify cos mean / min | SQNR dB | nDCG@10 PyTorch → engine (loss) | verdict |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for mname, res in results["models"].items():
        for vname, e in res.get("engines", {}).items():
            par = e.get("parity") or {}
            fb = e.get("fallback") or {}
            if not par:
                continue
            a, f = fb.get("all_quantized") or {}, fb.get("final") or {}
            probe = (f"{a.get('cos_min', float('nan')):.4f} / {a.get('sqnr_db', float('nan')):.1f}" if a else "–")
            final = (f"{f.get('cos_min', float('nan')):.4f} / {f.get('sqnr_db', float('nan')):.1f} "
                     f"({f.get('margin_worst_db', 0):.1f}, {f.get('margin_sqnr_db', 0):.1f})" if f else "–")
            kept = str(len(fb.get("kept_float", []))) if fb else "–"
            nd = (f"{par['ndcg@10_pytorch']:.4f} → {par['ndcg@10_engine']:.4f} "
                  f"({100 * par.get('ndcg@10_rel_loss', 0):+.2f}%)") if "ndcg@10_pytorch" in par else "–"
            verdict = "built" if e.get("ok") else "**refused**: " + e.get("error", "").split(": ", 1)[-1][:90]
            rows.append(f"| {mname} | {vname} | {probe} | {kept} | {final} | {par.get('cos_mean', float('nan')):.4f} / "
                        f"{par.get('cos_min', float('nan')):.4f} | {par.get('sqnr_db', float('nan')):.1f} | {nd} | {verdict} |")
    return "\n".join(rows)


def flops(engine_sparse: Path, engine_dense: Path, tokenizer_texts: list[str]) -> dict:
    from moe2edge.targets.onnx_graph import count_matmul_flops
    from moe2edge.targets.runtime import load_engine

    e = load_engine(engine_sparse)
    ids, mask, _ = e.tokenizer(tokenizer_texts[:32])
    feeds = {"input_ids": ids, "attention_mask": mask}
    out = {"batch": list(ids.shape), "real_tokens": int(mask.sum())}
    for name, folder in (("sparse", engine_sparse), ("all_experts", engine_dense)):
        f = count_matmul_flops(folder / "model.onnx", feeds)
        out[name] = {"total_gflop": round(f["total"] / 1e9, 2), "experts_gflop": round(f["experts"] / 1e9, 2),
                     "other_gflop": round(f["other"] / 1e9, 2)}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="runs/targets")
    p.add_argument("--models", nargs="+", default=["minilm-moe", "minilm-moe-distinct", "minilm-dense"])
    p.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS] + ["onnx-fp32-all-experts"])
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="trained MoE teacher checkpoint (minilm-moe)")
    p.add_argument("--table", action="store_true", help="only print the INT8 table of an existing results.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "nncf", "torch.onnx", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    from moe2edge.data.installed import compile_text_sets
    from moe2edge.targets.base import CompileConfig, TargetError
    from moe2edge.targets.bench import bench, table
    from moe2edge.targets.build import compile_engine
    from moe2edge.teacher.checkpoint import checkpoint_hash, load_pretrained

    torch.set_num_threads(1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.table:
        print(int8_table(json.loads((work / "results.json").read_text())))
        return 0
    verify, calib, probe, split = compile_text_sets(verify_pairs=200)
    results = {"verify_pairs": len(verify), "calibration_texts": len(calib), "probe_texts": [len(x) for x in probe],
               "text_split": split, "models": {}}
    if (work / "results.json").exists():  # rerunning some variants updates their rows, keeps the others
        results["models"] = json.loads((work / "results.json").read_text()).get("models", {})
    variants = dict(VARIANTS + [("onnx-fp32-all-experts", {"target": "onnx", "all_experts": True})])
    for mname, ckpt in checkpoints(work, a.teacher).items():
        if mname not in a.models:
            continue
        model = load_pretrained(ckpt)
        res = results["models"].setdefault(mname, {})
        res.update(checkpoint=str(ckpt))
        res.setdefault("engines", {})
        if model.config.moe_layers:
            from moe2edge.targets.runtime import Tokenizer
            from moe2edge.teacher.upcycling import expert_diversity

            tok = Tokenizer(ckpt / "tokenizer.json", max_length=128, pad_id=model.config.pad_token_id)
            res["expert_diversity"] = expert_diversity(model, *tok([t for p in verify[:40] for t in p])[:2])
            log.info("%s experts: %s", mname, res["expert_diversity"])
        for vname in a.variants:
            if vname.endswith("all-experts") and not model.config.moe_layers:
                continue
            out = work / "engines" / f"{mname}-{vname}"
            t = time.perf_counter()
            try:
                man = compile_engine(model=model, tokenizer_file=ckpt / "tokenizer.json", out_dir=out,
                                     cfg=CompileConfig(**variants[vname]), verify_pairs=verify,
                                     calibration_texts=calib, probe_texts=probe, text_split=split,
                                     source_hash=checkpoint_hash(ckpt))
                q = man["identity"]["artifact"].get("quantizer") or {}
                res["engines"][vname] = {"dir": str(out), "parity": man["parity"], "ok": True,
                                         "fallback": q.get("fallback"), "text_sets": man["identity"].get("text_sets"),
                                         "compile_s": round(time.perf_counter() - t, 1)}
            except TargetError as e:
                res["engines"][vname] = {"ok": False, "error": str(e), "parity": getattr(e, "parity", None),
                                         "compile_s": round(time.perf_counter() - t, 1)}
            log.info("%s %s: %s", mname, vname, res["engines"][vname].get("parity") or res["engines"][vname])
            (work / "results.json").write_text(json.dumps(results, indent=2))
        if "onnx-fp32" in res["engines"] and res["engines"].get("onnx-fp32-all-experts", {}).get("ok"):
            res["flops"] = flops(Path(res["engines"]["onnx-fp32"]["dir"]),
                                 Path(res["engines"]["onnx-fp32-all-experts"]["dir"]), [p[1] for p in verify])
            log.info("FLOPs: %s", res["flops"])
        if not a.skip_bench:
            engines = [v["dir"] for v in res["engines"].values() if v.get("ok")]
            res["bench"] = bench(engines, pytorch=ckpt, threads=(1, 2), repeats={1: 20, 32: 5})
            print(table(res["bench"]))
        (work / "results.json").write_text(json.dumps(results, indent=2))
    print(int8_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
