"""Optional dependencies are checked in ONE place (house style rule 4).

``require("triton", extra="kernels")`` returns the module or raises a clear ``MissingExtraError``
naming the pip extra; ``has("triton")`` answers without raising. Importing the package never fails
because an optional backend is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from moe2edge.errors import UserError


class MissingExtraError(UserError, ImportError):
    """An optional backend is not installed; the message names the extra that brings it."""


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, *, extra: str | None, purpose: str = "", hint: str = "") -> ModuleType:
    """Import ``module`` or raise naming what installs it: the pip extra ``extra`` (one of pyproject's
    ``[project.optional-dependencies]``, tested), or, with ``extra=None`` (a core dependency, or
    something no extra brings, like TensorRT), ``hint``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = f" for {purpose}" if purpose else ""
        how = f"pip install 'moe2edge[{extra}]'" if extra else (hint or "pip install moe2edge")
        raise MissingExtraError(f"'{module}' is needed{what} but is not installed: {how}") from e
