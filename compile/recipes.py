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

    cfg = read_json_file(path, "config file", expect=dict)
    unknown = set(cfg) - KNOWN_SECTIONS
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}; expected {sorted(KNOWN_SECTIONS)}")
    return cfg


INIT_SECTION = {"checkpoint": str, "upcycle": dict | None, "prompts": str}
UPCYCLE_KEYS = {"num_experts": int, "top_k": int, "every_n_layers": int, "keep_biases": bool, "normalize": bool,
                "router_std": float, "seed": int}  # = teacher.upcycling.upcycle's keywords


def validate_config(cfg: dict, where: str = "config"):
    """Every section, key and value type of a training recipe, before any data or model work; returns the
    TrainConfig."""
    from moe2edge._config import DATA_SECTION, check_section, from_dict
    from moe2edge.teacher.train import TrainConfig

    init = check_section(cfg.get("init"), INIT_SECTION, where=f"{where} init")
    check_section(init.get("upcycle"), UPCYCLE_KEYS, where=f"{where} init.upcycle")
    if init.get("prompts", "keep") not in ("keep", "none", "nomic"):
        raise ValueError(f"{where} init.prompts must be 'keep', 'none' or 'nomic', got {init['prompts']!r}")
    check_section(cfg.get("data"), DATA_SECTION, where=f"{where} data")
    return from_dict(TrainConfig, cfg.get("train", {}), where=f"{where} train")


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
    return pairs


def check_train_outputs(cfg: dict, out_dir: str | Path, *, resume_from=None, force: bool = False) -> None:
    """The checkpoint folders this run will write (``OUT/checkpoint-N``, ``OUT/final``) may be replaced: each
    absent, or a checkpoint this tool wrote holding nothing else (else ``force``), and none of them is or
    holds an input (the start checkpoint, --resume, the pairs). Checked before the data or the model."""
    from moe2edge._io import safe_output

    out_dir = Path(out_dir)
    tcfg = validate_config(cfg)
    init_ckpt = (cfg.get("init") or {}).get("checkpoint")
    inputs = [init_ckpt if init_ckpt and init_ckpt != "minilm" else None, resume_from,
              (cfg.get("data") or {}).get("pairs")]
    names = [f"checkpoint-{s}" for s in range(tcfg.save_every, tcfg.steps + 1, tcfg.save_every)] if tcfg.save_every \
        else []
    for name in [*names, "final"]:
        if name != "final" and resume_from and (out_dir / name).resolve() == Path(resume_from).resolve():
            continue  # the checkpoint resumed from: training continues after its step, it is not written again
        safe_output(out_dir / name, inputs=inputs, force=force, kinds=("checkpoint",), flag=f"--out {out_dir}:")


def train_from_config(cfg: dict, out_dir: str | Path, *, resume_from=None, progress: bool = True, force: bool = False):
    """Run one recipe; returns (embedder, history, final checkpoint path). Checkpoint folders under ``out_dir``
    never replace files this tool did not write (``check_train_outputs``; ``force`` allows it)."""
    from moe2edge._io import write_json
    from moe2edge.teacher.train import Trainer, init_distributed_from_env

    init_distributed_from_env()
    tcfg = validate_config(cfg)  # the recipe, before any data or model work
    check_train_outputs(cfg, out_dir, resume_from=resume_from, force=force)
    pairs = load_training_pairs(cfg.get("data", {}))
    emb = build_model(cfg.get("init", {}))
    out_dir = Path(out_dir)
    trainer = Trainer(emb, tcfg, out_dir=out_dir, force_output=force)
    history = trainer.fit(pairs, resume_from=resume_from, progress=progress)
    final = trainer.save_checkpoint(trainer._data, out_dir / "final")
    if trainer.rank == 0:
        write_json(out_dir / "history.json", history)
        write_json(out_dir / "recipe.json", cfg)
    return emb, history, final
