"""Argument types and shared flags of the CLI: a bad value is an argparse error naming the flag (one line,
exit 2) before any work starts. Imports nothing heavy (``moe2edge --help`` stays torch-free)."""

from __future__ import annotations

import argparse
import math


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return x


def positive_int(text: str) -> int:
    """>= 1 (counts, sizes, thread numbers, repeats)."""
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def nonneg_int(text: str) -> int:
    """>= 0 (e.g. fine-tune steps, where 0 means build only)."""
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def open_fraction(text: str) -> float:
    """A fraction strictly between 0 and 1."""
    x = _float(text)
    if not 0.0 < x < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return x


def cosine_threshold(text: str) -> float:
    """A cosine-similarity threshold in (0, 1]."""
    x = _float(text)
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"a cosine threshold must be in (0, 1], got {text}")
    return x


def positive_float(text: str) -> float:
    x = _float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return x


def nonneg_float(text: str) -> float:
    x = _float(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return x


def int_list(text: str) -> list[int]:
    """Comma-separated integers >= 0, e.g. ``0,2,4``."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 0,2,4), got {text!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0 (e.g. 0,2,4), got {text!r}")
    return out


def add_force(p, what: str = "--out") -> None:
    p.add_argument("--force", action="store_true",
                   help=f"replace an existing {what} that this tool did not write (never an input or a folder "
                        "holding one)")


def add_integrity(p) -> None:
    p.add_argument("--skip-integrity-check", action="store_true",
                   help="load engines / checkpoints / students without comparing their files with the sizes and "
                        "sha256 recorded in their manifest (default: checked, a mismatch is refused)")
