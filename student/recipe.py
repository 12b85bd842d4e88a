"""One student recipe from a JSON config: build (prune | densify | static), distil, save with lineage.

    {
      "student":     {"kind": "pruned", "num_experts": 4, "top_k": 1, "score": "router", "merge": true,
                      "normalize": null, "rescale": true}
                   | {"kind": "dense", "init": "merge", "layers": [0, 2, 4], "intermediate_size": 768, "rescale": true,
                      "refit": true}
                   | {"kind": "static", "dim": 256, "weighting": "sif", "vocab": "all" | "corpus"},
      "calibration": {"texts": 512, "max_tokens": 16384},
      "data":        {"pairs": PATH, "languages": ["en"], "max_pairs": 8000, "seed": 0},
      "train":       {... TrainConfig fields; "steps": 0 skips the fine-tune ...},
      "loss":        {... DistillLoss fields ...}
    }
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)

SECTIONS = {"student", "calibration", "data", "train", "loss"}
STUDENT_KEYS = {
    "pruned": {"kind", "num_experts", "top_k", "score", "merge", "normalize", "rescale"},
    "dense": {"kind", "init", "score", "layers", "intermediate_size", "rescale", "refit"},
    "static": {"kind", "dim", "weighting", "sif_coefficient", "vocab"},
}
# JSON types of the student keys (checked up front: a wrong type fails naming student.KEY).
STUDENT_TYPES = {"kind": str, "num_experts": int, "top_k": int, "score": str, "merge": bool, "normalize": bool | None,
                 "rescale": bool, "init": str, "layers": list[int] | None, "intermediate_size": int | None,
                 "refit": bool, "dim": int | None, "weighting": str, "sif_coefficient": float, "vocab": str}
CALIBRATION_KEYS = {"texts": int, "max_tokens": int, "seed": int}


def load_recipe(path: str | Path) -> dict:
    from moe2edge._io import read_json_file

    return read_json_file(path, "student config", expect=dict)


def validate_recipe(cfg: dict) -> dict:
    """Check sections, keys and value types up front (before any model work); returns cfg."""
    from moe2edge._config import DATA_SECTION, check_section, from_dict

    if not isinstance(cfg, dict):
        raise ValueError(f"student config: expected a JSON object, got {type(cfg).__name__}")
    unknown = set(cfg) - SECTIONS
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)}; expected {sorted(SECTIONS)}")
    st = cfg.get("student") or {}
    kind = st.get("kind")
    if kind not in STUDENT_KEYS:
        raise ValueError(f"student.kind must be one of {', '.join(STUDENT_KEYS)}, got {kind!r}")
    bad = set(st) - STUDENT_KEYS[kind]
    if bad:
        raise ValueError(f"student keys {sorted(bad)} do not apply to kind {kind!r} "
                         f"(allowed: {', '.join(sorted(STUDENT_KEYS[kind]))})")
    check_section(st, STUDENT_TYPES, where="config student")
    check_section(cfg.get("calibration"), CALIBRATION_KEYS, where="config calibration")
    check_section(cfg.get("data"), DATA_SECTION, where="config data")
    from moe2edge.student.distill import DistillLoss
    from moe2edge.teacher.train import TrainConfig

    from_dict(DistillLoss, cfg.get("loss", {}), where="config loss")
    train = cfg.get("train", {})
    steps = train.get("steps", 1) if isinstance(train, dict) else 1
    if isinstance(steps, int) and not isinstance(steps, bool) and steps < 0:
        raise ValueError(f"config train.steps must be >= 0 (0: build the student without fine-tuning), got {steps}")
    if steps:
        from_dict(TrainConfig, train, where="config train")
    return cfg


def calibration_texts(teacher, pairs: list, n: int, seed: int = 0) -> list[str]:
    """Real text as the model sees it at run time: prefixed queries and documents, interleaved."""
    rng = random.Random(seed)
    sample = rng.sample(pairs, min(len(pairs), (n + 1) // 2))
    qp, dp = teacher.prefix("search_query"), teacher.prefix("search_document")
    out = []
    for p in sample:
        out += [qp + p.query, dp + p.positive]
    return out[:n]


def check_compatible(teacher, student_cfg: dict) -> None:
    """A student config that this teacher cannot produce: say so before any compute."""
    cfg = teacher.model.config
    kind = student_cfg["kind"]
    if kind == "pruned":
        if not cfg.moe_layers:
            raise ValueError("student.kind='pruned' needs an MoE teacher; this teacher is dense "
                             "(use kind 'dense' or 'static')")
        n = student_cfg.get("num_experts", cfg.num_experts)
        if not 1 <= n <= cfg.num_experts:
            raise ValueError(f"student.num_experts={n} must be in [1, {cfg.num_experts}] "
                             f"(the teacher has {cfg.num_experts} experts per MoE layer)")
        k = student_cfg.get("top_k", min(cfg.moe_top_k, n))
        if not 1 <= k <= n:
            raise ValueError(f"student.top_k={k} must be in [1, num_experts={n}]")
    elif kind == "dense":
        layers = student_cfg.get("layers")
        if layers is not None and any(not 0 <= int(i) < cfg.num_layers for i in layers):
            raise ValueError(f"student.layers={layers}: the teacher has layers 0..{cfg.num_layers - 1}")
        f = student_cfg.get("intermediate_size")
        if f is not None and not 1 <= f <= cfg.intermediate_size:
            raise ValueError(f"student.intermediate_size={f} must be in [1, {cfg.intermediate_size}]")
    elif kind == "static":
        d = student_cfg.get("dim", 256)
        if d is not None and not 1 <= d <= cfg.hidden_size:
            raise ValueError(f"student.dim={d} must be in [1, {cfg.hidden_size}] (the teacher's hidden size)")
        from moe2edge.student.static import VOCABS

        if student_cfg.get("vocab", "all") not in VOCABS:
            raise ValueError(f"student.vocab must be one of {', '.join(VOCABS)}, got {student_cfg['vocab']!r}")


def student_tokenizer(static):
    """The static student's own tokenizer (its vocabulary may be pruned) for the teacher's Trainer."""
    from moe2edge.teacher.embedder import Tokenizer

    return Tokenizer(static.tokenizer_file, max_length=static.config.max_seq_length, pad_id=static.config.pad_token_id)


def build_student(teacher, student_cfg: dict, *, calib=None, corpus: list[str] | None = None):
    """-> (student Embedder | StaticEmbedder). ``calib`` is needed for pruned and dense."""
    from moe2edge.teacher.embedder import Embedder

    opts = {k: v for k, v in student_cfg.items() if k != "kind"}
    kind = student_cfg["kind"]
    if kind == "pruned":
        from moe2edge.student.prune import prune_experts

        opts.setdefault("num_experts", teacher.model.config.num_experts)
        return Embedder(prune_experts(teacher.model, calib, **opts), teacher.tokenizer)
    if kind == "dense":
        from moe2edge.student.dense import densify

        return Embedder(densify(teacher.model, calib, **opts), teacher.tokenizer)
    from moe2edge.student.static import distill_static

    return distill_static(teacher, corpus=corpus, **opts)


def distill_from_config(cfg: dict, *, teacher_path: str | Path, out: str | Path, progress: bool = True,
                        force: bool = False):
    """Run one recipe end to end; returns (student, manifest). ``out`` gets the student folder (an existing one
    is replaced only if it is a student folder this tool wrote, unless ``force``)."""
    from moe2edge.teacher.pairs import load_training_pairs
    from moe2edge.student.calibration import calibrate
    from moe2edge.student.distill import DistillLoss, distill, manifest, save_student
    from moe2edge.student.static import StaticEmbedder
    from moe2edge.teacher import load_embedder
    from moe2edge.teacher.embedder import Embedder
    from moe2edge.teacher.train import TrainConfig

    validate_recipe(cfg)
    st = cfg["student"]
    teacher = load_embedder(teacher_path)
    check_compatible(teacher, st)
    train_d = dict(cfg.get("train", {}))
    steps = train_d.get("steps", 60)
    pairs = load_training_pairs(cfg["data"]) if (cfg.get("data") or {}).get("pairs") else []
    cal = cfg.get("calibration", {})
    calib = None
    if st["kind"] in ("pruned", "dense"):
        if not pairs:
            raise ValueError("pruned/dense students need data.pairs for calibration text")
        texts = calibration_texts(teacher, pairs, cal.get("texts", 512), cal.get("seed", 0))
        calib = calibrate(teacher.model, teacher.tokenizer, texts, max_tokens=cal.get("max_tokens", 16384))
    corpus = None
    if st["kind"] == "static" and (st.get("weighting", "sif") == "sif" or st.get("vocab", "all") == "corpus"):
        if not pairs:
            raise ValueError("the static student's 'sif' weighting and 'corpus' vocab need data.pairs to count tokens")
        corpus = [t for p in pairs for t in (p.query, p.positive)]
    student = build_student(teacher, st, calib=calib, corpus=corpus)
    history = None
    if steps:
        if not pairs:
            raise ValueError("the distillation fine-tune needs data.pairs (or train.steps = 0)")
        train_d.setdefault("aux_loss_coef", 0.0)  # spec section 3: no load balancing when finetuning
        tcfg = TrainConfig(**train_d)
        emb = Embedder(student.to_model(), student_tokenizer(student)) if isinstance(student, StaticEmbedder) \
            else student
        history = distill(emb, teacher, pairs, train=tcfg, loss=DistillLoss(**cfg.get("loss", {})),
                          progress=progress)
        student = emb
    model = student.model if hasattr(student, "model") else None
    m = manifest(kind=st["kind"], teacher_path=teacher_path, recipe=cfg, pairs=pairs or None,
                 calibration=calib.summary() if calib is not None else None, history=history,
                 student_model=model)
    # the history rides in the same atomic rename (and file list) as the student
    path = save_student(student, out, manifest_dict=m, extra_files={"history.json": history} if history else None,
                        force=force)
    log.info("student %s -> %s", st["kind"], path)
    return student, m
