"""The CPU teacher run and its matched dense baseline, evaluated on the frozen benchmark.

    .venv/bin/python bench/teacher_cpu.py [--steps 60] [--out runs/bench-teacher]
    .venv/bin/python bench/teacher_cpu.py --throughput   # tokens/s, 1 process vs 2 (torchrun, gloo)

Trains configs/cpu-default.json (MiniLM upcycled to 8 experts top-2) and configs/cpu-dense-baseline.json
(the same data, steps and recipe on the dense MiniLM), evaluates both and the untrained MiniLM, and
prints Markdown tables (English and per-language nDCG@10, expert load per layer) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def train_and_eval(name: str, steps: int, out: Path) -> dict:
    import torch

    from moe2edge.compile.pipeline import FROZEN_BENCHMARK, ensure_training_pairs
    from moe2edge.compile.recipes import load_config, train_from_config
    from moe2edge.data.evaluate import evaluate_dense
    from moe2edge.data.readers import load_beir
    from moe2edge.teacher import expert_load

    cfg = load_config(ROOT / "configs" / f"{name}.json")
    cfg["data"]["pairs"] = str(ensure_training_pairs())
    cfg["train"]["steps"] = steps
    t0 = time.perf_counter()
    emb, hist, final = train_from_config(cfg, out / name)
    train_s = time.perf_counter() - t0
    emb.name = name
    res = evaluate_dense(emb, load_beir(FROZEN_BENCHMARK), batch_size=64)
    res["train"] = {"steps": steps, "seconds": train_s, "tokens_per_s_median": sorted(h["tokens_per_s"] for h in hist)[len(hist) // 2]}
    if emb.model.config.moe_layers:
        ids, mask, _ = emb.tokenizer([p for p in load_beir(FROZEN_BENCHMARK).doc_texts()[:256]])
        with torch.no_grad():
            res["expert_load"] = expert_load(emb.model.embed(ids, mask).router_stats).numpy().round(3).tolist()
    return res


def throughput(steps: int) -> dict:
    """Median training tokens/s of the default recipe, one process vs two (torchrun + gloo)."""
    out = {}
    for nproc in (1, 2):
        d = ROOT / "runs" / f"bench-throughput-{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "-m",
               "moe2edge.compile.cli", "-q", "teacher", "train", "--steps", str(steps), "--out", str(d),
               "--threads", "1"]
        subprocess.run(cmd, check=True, cwd=ROOT)
        hist = json.loads((d / "history.json").read_text())[1:]  # first step includes warm-up
        tps = sorted(h["tokens_per_s"] for h in hist)
        out[nproc] = tps[len(tps) // 2]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-teacher"))
    p.add_argument("--throughput", action="store_true")
    args = p.parse_args()
    if args.throughput:
        tps = throughput(min(args.steps, 8))
        print("| processes | tokens/s (median) | vs 1 process |\n|---|---|---|")
        for n, v in tps.items():
            print(f"| {n} | {v:.0f} | {v / tps[1]:.2f}x |")
        return
    out = Path(args.out)
    rows = [train_and_eval(n, args.steps, out) for n in ("cpu-default", "cpu-dense-baseline")]
    langs = sorted({k for r in rows for k in r["metrics"]["per_language"]}, key=lambda k: (k != "en", k))
    print("| model | " + " | ".join(langs) + " |\n|---|" + "---|" * len(langs))
    for r in rows:
        per = r["metrics"]["per_language"]
        print(f"| {r['model']['name']} | " + " | ".join(f"{per[k]['ndcg@10']:.3f}" for k in langs) + " |")
    for r in rows:
        print(f"{r['model']['name']}: train {r['train']['seconds']:.0f}s, {r['train']['tokens_per_s_median']:.0f} tok/s")
        for i, row in enumerate(r.get("expert_load", [])):
            print(f"  expert load layer {2 * i + 1}: " + " ".join(f"{x:.3f}" for x in row))
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
