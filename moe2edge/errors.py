"""The project's error types: what the CLI shows as a one-line user error, and what it calls a bug.

Every error that bad input, a bad environment or a refused request can cause derives from
:class:`UserError` (``CheckpointError``, ``TargetError`` and its family, ``EngineFolderError``,
``MalformedInputError``, ``MissingExtraError``, ``OutputError``, ``IntegrityError``). The CLI prints
such an error as ``moe2edge CMD: error: MESSAGE`` (one line: what, which file / key / line / flag,
what to do) and exits 2; ``-v`` adds the traceback.

Python's own ``ValueError`` (this code base's "bad argument value", also raised by config
dataclasses' ``__post_init__``), ``OSError`` (missing file, permission denied, disk full) and
``ImportError`` (a missing backend) count as user errors too: they are what the standard library
raises for bad input. Anything else (``IndexError``, ``KeyError``, ``TypeError``, ``RuntimeError``,
...) is a bug in this tool: the CLI says so, names where it happened and exits 1 instead of dressing
it up as the user's mistake. Nothing here imports anything (the CLI's ``--help`` stays instant).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a bad environment or a refused request; the message names the culprit and the fix."""


class OutputError(UserError, ValueError):
    """An output path that may not be written (it would replace an input or files this tool did not write)."""


class IntegrityError(UserError, ValueError):
    """A file of an artifact folder differs from the size / sha256 its manifest records."""


# What the CLI reports as the user's problem (one line, exit 2). Order does not matter.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, ImportError)


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS)


def one_line(message: str, limit: int = 600) -> str:
    """Collapse a message onto one line (a library's multi-line text would otherwise break the contract)."""
    text = " | ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_os_error(e: OSError) -> str:
    """``PATH: reason`` for an OSError (``[Errno 28] No space left on device: 'x'`` -> ``x: No space left
    on device``), with a hint for the usual causes."""
    reason = e.strerror or str(e)
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    hint = {13: "check the permissions", 28: "free some space or write elsewhere", 30: "write elsewhere",
            21: "give a file path, not a folder", 20: "a part of the path is a file, not a folder",
            1: "check the permissions (immutable file or folder?)", 122: "free some space or write elsewhere"
            }.get(e.errno or 0)
    msg = f"{where}: {reason}" if where else reason
    return f"{msg} ({hint})" if hint else msg
