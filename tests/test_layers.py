"""Imports go one way: each package imports only itself and the packages below it (README "Layout").

    moe2edge/ (root helpers) <- data <- kernels <- teacher <- student <- targets <- compile

Read from the source with ``ast`` (every ``import``, at the top or inside a function), so an upward import
fails here even when no test happens to execute it. ``bench/`` and ``tests/`` are scripts above all of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> rank; a module may import ranks <= its own (its own package included), never a higher one.
LAYERS = {"moe2edge": 0, "data": 1, "kernels": 2, "teacher": 3, "student": 4, "targets": 5, "compile": 6}


def imported_packages(source: str) -> list[tuple[int, str]]:
    """(line, first-level moe2edge package) of every absolute moe2edge import in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module + "." + a.name for a in node.names] if node.module == "moe2edge" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "moe2edge":
                out.append((node.lineno, parts[1] if len(parts) > 1 and parts[1] in LAYERS else "moe2edge"))
    return out


def upward_imports(folder: str, source: str) -> list[str]:
    return [f"line {line}: {folder} imports {pkg}" for line, pkg in imported_packages(source)
            if LAYERS[pkg] > LAYERS[folder]]


def test_imports_only_go_down():
    bad = []
    for folder in LAYERS:
        files = sorted((ROOT / folder).glob("*.py"))
        assert files, folder
        for f in files:
            bad += [f"{f.relative_to(ROOT)} {b}" for b in upward_imports(folder, f.read_text(encoding="utf-8"))]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_an_upward_import_is_caught():
    src = "import os\n\ndef f():\n    from moe2edge.compile.recipes import load_config\n    from moe2edge import _io\n"
    assert upward_imports("student", src) == ["line 4: student imports compile"]
    assert upward_imports("compile", src) == []
    assert upward_imports("data", "from moe2edge import teacher\n") == ["line 1: data imports teacher"]
