"""Config dataclasses from JSON recipes, checked key by key: a typo or a wrong type is one error naming
``section.key`` and what is allowed (a raw ``TypeError: __init__() got an unexpected keyword`` before)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing


def _ok(value, hint) -> bool:
    """Does a JSON value fit a (simple) type hint? Unknown hints accept anything."""
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(any(_ok(v, a) for a in args) or not args for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def from_dict(cls, d, *, where: str):
    """``cls(**d)`` after checking that ``d`` is an object whose keys are fields of ``cls`` with values of the
    annotated types; the dataclass's own ``__post_init__`` checks (ranges) follow as ValueErrors."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object of {cls.__name__} fields, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        import difflib

        hints = [m for k in unknown for m in difflib.get_close_matches(k, list(fields), n=1)]
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}"
                         + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                         + f"; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    for k, v in d.items():
        if not _ok(v, hints.get(k, typing.Any)):
            raise ValueError(f"{where}.{k}: expected {_name(hints[k])}, got {type(v).__name__} {v!r}")
    try:
        return cls(**d)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def check_section(d, schema: dict, *, where: str) -> dict:
    """A plain JSON object section (no dataclass behind it): known keys, values of the given type hints."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(schema))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(schema)}")
    for k, v in d.items():
        if not _ok(v, schema[k]):
            raise ValueError(f"{where}.{k}: expected {_name(schema[k])}, got {type(v).__name__} {v!r}")
    return d


# The "data" section shared by the teacher and student recipes (compile/recipes.load_training_pairs).
DATA_SECTION = {"pairs": str, "languages": list[str] | None, "max_pairs": int | None, "seed": int,
                "prepare": dict | None}  # prepare: compile/recipes.py PREPARE_KEYS
