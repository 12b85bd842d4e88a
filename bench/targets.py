"""Compile every target x precision for the upcycled MiniLM MoE teacher and MiniLM dense, then benchmark.

    .venv/bin/python bench/targets.py --work runs/targets [--quick]

Writes runs/targets/{ckpt-*,engines/*}, results.json (parity per engine, sparse vs all-experts FLOPs,
benchmark) and prints the tables. Failures (a variant below its threshold) are recorded, not fatal.
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


def checkpoints(work: Path) -> dict[str, Path]:
    import torch

    from moe2edge.teacher import load_embedder, minilm_path, upcycle
    from moe2edge.teacher.embedder import Embedder

    torch.manual_seed(0)
    moe_dir = work / "ckpt-minilm-moe"
    if not (moe_dir / "config.json").exists():
        dense = load_embedder(minilm_path())
        Embedder(upcycle(dense.model), dense.tokenizer).save(moe_dir)
    return {"minilm-moe": moe_dir, "minilm-dense": Path(minilm_path())}


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
    p.add_argument("--models", nargs="+", default=["minilm-moe", "minilm-dense"])
    p.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS] + ["onnx-fp32-all-experts"])
    p.add_argument("--skip-bench", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "nncf", "torch.onnx", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    from moe2edge.data.installed import installed_descriptions
    from moe2edge.targets.base import CompileConfig, TargetError
    from moe2edge.targets.bench import bench, table
    from moe2edge.targets.build import compile_engine
    from moe2edge.teacher.checkpoint import checkpoint_hash, load_pretrained

    torch.set_num_threads(1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    allp = installed_descriptions(limit=None)
    verify, calib = allp[0::2][:200], [t for p in allp[1::2][:200] for t in p]
    results = {"verify_pairs": len(verify), "calibration_texts": len(calib), "models": {}}
    if (work / "results.json").exists():  # rerunning some variants updates their rows, keeps the others
        results["models"] = json.loads((work / "results.json").read_text()).get("models", {})
    variants = dict(VARIANTS + [("onnx-fp32-all-experts", {"target": "onnx", "all_experts": True})])
    for mname, ckpt in checkpoints(work).items():
        if mname not in a.models:
            continue
        model = load_pretrained(ckpt)
        res = results["models"].setdefault(mname, {})
        res.update(checkpoint=str(ckpt))
        res.setdefault("engines", {})
        for vname in a.variants:
            if vname.endswith("all-experts") and not model.config.moe_layers:
                continue
            out = work / "engines" / f"{mname}-{vname}"
            t = time.perf_counter()
            try:
                man = compile_engine(model=model, tokenizer_file=ckpt / "tokenizer.json", out_dir=out,
                                     cfg=CompileConfig(**variants[vname]), verify_pairs=verify,
                                     calibration_texts=calib, source_hash=checkpoint_hash(ckpt))
                res["engines"][vname] = {"dir": str(out), "parity": man["parity"], "ok": True,
                                         "compile_s": round(time.perf_counter() - t, 1)}
            except TargetError as e:
                res["engines"][vname] = {"ok": False, "error": str(e), "parity": getattr(e, "parity", None)}
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
