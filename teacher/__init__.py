"""The Nomic-Embed-v2-style MoE teacher: model, presets, checkpoint I/O, upcycling, embedding API."""

from moe2edge.teacher.model import (
    NOMIC_PROMPTS, PRESETS, NomicMoE, RouterStats, TeacherConfig, expert_load, get_preset, load_balancing_loss,
)

__all__ = [
    "NOMIC_PROMPTS", "PRESETS", "NomicMoE", "RouterStats", "TeacherConfig", "expert_load", "get_preset",
    "load_balancing_loss", "load_embedder", "load_pretrained", "save_pretrained", "upcycle", "Embedder",
    "CheckpointError",
]


def __getattr__(name):  # lazy: keep `import moe2edge.teacher` cheap for the CLI
    if name in ("load_embedder", "Embedder", "minilm_path"):
        from moe2edge.teacher import embedder

        return getattr(embedder, name)
    if name in ("load_pretrained", "save_pretrained", "CheckpointError", "checkpoint_hash"):
        from moe2edge.teacher import checkpoint

        return getattr(checkpoint, name)
    if name == "upcycle":
        from moe2edge.teacher.upcycling import upcycle

        return upcycle
    raise AttributeError(name)
