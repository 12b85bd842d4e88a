"""What the load-time integrity check costs: load a checkpoint with the file check off, on with a cold
hash cache, and on with a warm one (same process, interleaved, median of N).

    .venv/bin/python bench/integrity.py --work /tmp/integrity [--repeats 5]

The checkpoint is the upcycled all-MiniLM-L6-v2 MoE teacher (8 experts at layers 1, 3, 5: the demo's
shape), written by save_pretrained (so it carries moe2edge_files.json). Also reports raw sha256 speed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/moe2edge-integrity")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from moe2edge import _integrity as integ
    from moe2edge.teacher import load_embedder, minilm_path, upcycle
    from moe2edge.teacher.checkpoint import load_pretrained
    from moe2edge.teacher.embedder import Embedder

    work = Path(a.work)
    ckpt = work / "minilm-moe"
    os.environ[integ.CACHE_ENV] = str(work / "hash-cache.json")
    if not (ckpt / "moe2edge_files.json").exists():
        torch.manual_seed(0)
        dense = load_embedder(minilm_path())
        Embedder(upcycle(dense.model), dense.tokenizer).save(ckpt, force=True)
    time.sleep(max(0.0, integ._RACY_S + 0.5 - (time.time() - (ckpt / "model.safetensors").stat().st_ctime)))
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())

    def cold():
        integ._memory.clear()
        integ._disk = {}
        t = time.perf_counter()
        load_pretrained(ckpt, check=True)
        return time.perf_counter() - t

    def off():
        t = time.perf_counter()
        load_pretrained(ckpt, check=False)
        return time.perf_counter() - t

    def warm():
        t = time.perf_counter()
        load_pretrained(ckpt, check=True)
        return time.perf_counter() - t

    def warm_disk():  # a new process: memory cache empty, disk cache filled
        integ._memory.clear()
        integ._disk = None
        t = time.perf_counter()
        load_pretrained(ckpt, check=True)
        return time.perf_counter() - t

    off()  # page cache warm for every variant
    res = {k: [] for k in ("off", "cold", "warm_memory", "warm_disk")}
    for _ in range(a.repeats):  # interleaved
        res["off"].append(off())
        res["cold"].append(cold())
        res["warm_memory"].append(warm())
        res["warm_disk"].append(warm_disk())
    data = (ckpt / "model.safetensors").read_bytes()
    t = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    sha_mb_s = len(data) / 1e6 / (time.perf_counter() - t)
    med = {k: round(statistics.median(v) * 1000, 1) for k, v in res.items()}
    out = {"checkpoint_mb": round(size / 1e6, 1), "load_ms_median": med, "repeats": a.repeats,
           "sha256_mb_per_s": round(sha_mb_s), "loadavg": open("/proc/loadavg").read().split()[:3],
           "overhead_cold_vs_off": round(med["cold"] / med["off"], 2),
           "overhead_warm_vs_off": round(med["warm_disk"] / med["off"], 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
