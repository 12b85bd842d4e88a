"""Students of the MoE teacher: pruned experts, dense FFNs, a static token table; distillation.

Imports go one way (kernels <- teacher <- student). Heavy modules load lazily so the CLI stays fast.

    from moe2edge.student import calibrate, prune_experts, densify, distill_static, distill, load_student
"""

_EXPORTS = {
    "calibrate": "calibration", "Calibration": "calibration", "SCORES": "calibration",
    "prune_experts": "prune",
    "densify": "dense", "active_non_embedding_parameters": "dense",
    "distill_static": "static", "StaticEmbedder": "static", "StaticModel": "static", "load_static": "static",
    "is_static": "static",
    "distill": "distill", "DistillLoss": "distill", "Distiller": "distill", "load_student": "distill",
    "save_student": "distill", "manifest": "distill", "KINDS": "distill",
    "distill_from_config": "recipe", "build_student": "recipe", "load_recipe": "recipe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"moe2edge.student.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
