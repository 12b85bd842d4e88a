"""Training recipes from a JSON config: where the model starts, which pairs, which TrainConfig.

    {
      "init":  {"checkpoint": "minilm" | PATH, "upcycle": {"num_experts": 8, "top_k": 2, "every_n_layers": 2},
                "prompts": "none" | "nomic"},
      "data":  {"pairs": PATH, "languages": ["en"], "max_pairs": 4000, "seed": 0},
      "train": {... TrainConfig fields ...}
    }

``upcycle: null`` trains the dense model as is (the matched dense baseline).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cpu-default.json"
KNOWN_SECTIONS = {"init", "data", "train"}


def load_config(path: str | Path) -> dict:
    from moe2edge._io import read_json_file

    cfg = read_json_file(path, "config file")
    unknown = set(cfg) - KNOWN_SECTIONS
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}; expected {sorted(KNOWN_SECTIONS)}")
    return cfg


def build_model(init: dict):
    """The starting Embedder: a checkpoint, optionally upcycled."""
    from moe2edge.teacher import NOMIC_PROMPTS, load_embedder, minilm_path, upcycle
    from moe2edge.teacher.embedder import Embedder

    src = init.get("checkpoint", "minilm")
    base = load_embedder(minilm_path() if src == "minilm" else src)
    model = base.model
    if init.get("upcycle"):
        model = upcycle(model, **init["upcycle"])
    prompts = init.get("prompts", "keep")
    if prompts == "nomic":
        model.config.prompts = dict(NOMIC_PROMPTS)
    elif prompts == "none":
        model.config.prompts = {}
    return Embedder(model, base.tokenizer)


def load_training_pairs(data: dict):
    """Pairs of the requested languages, a deterministic sample of at most ``max_pairs``."""
    from moe2edge.data.readers import read_pairs

    path = data.get("pairs")
    if not path:
        raise ValueError("config data.pairs: no training pairs file given")
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
    return pairs


def train_from_config(cfg: dict, out_dir: str | Path, *, resume_from=None, progress: bool = True):
    """Run one recipe; returns (embedder, history, final checkpoint path)."""
    from moe2edge._io import write_json
    from moe2edge.teacher.train import Trainer, TrainConfig, init_distributed_from_env

    init_distributed_from_env()
    tcfg = TrainConfig(**cfg.get("train", {}))  # validates the recipe before any data or model work
    pairs = load_training_pairs(cfg.get("data", {}))
    emb = build_model(cfg.get("init", {}))
    out_dir = Path(out_dir)
    trainer = Trainer(emb, tcfg, out_dir=out_dir)
    history = trainer.fit(pairs, resume_from=resume_from, progress=progress)
    final = trainer.save_checkpoint(trainer._data, out_dir / "final")
    if trainer.rank == 0:
        write_json(out_dir / "history.json", history)
        write_json(out_dir / "recipe.json", cfg)
    return emb, history, final
