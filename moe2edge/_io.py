"""Atomic writes and output safety: a file or a whole folder appears complete or not at all (temp +
rename), and an output path replaces only what this tool wrote.

``safe_output`` is the ONE place that decides whether a path may be written (every command checks its
outputs with it before any heavy work, and ``atomic_dir`` checks again when it renames into place):

* never a path equal to or above an input (``compile --out`` = ``--model``, the model's parent folder,
  ``embed --output`` = ``--input``), not even with ``--force``;
* an existing folder is replaced only if it is empty or a folder this tool wrote of the expected kind
  (its manifest says so, see ``moe2edge._integrity.folder_kind``) that holds nothing its manifest does
  not list; anything else (a folder of the user's, a regular file, a checkpoint where an engine is
  expected, a file the user added) needs ``--force``;
* its nearest existing parent folder must be writable (tried, not guessed from mode bits: root, read-only
  mounts and immutable folders included), and there must be room for ``need_bytes``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from moe2edge.errors import OutputError

FORCE_HINT = "move it away, choose another path, or pass --force to replace it"


def _resolved(p) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))


def _existing_ancestor(path: Path) -> Path:
    anc = path.parent if str(path.parent) else Path(".")
    while not (anc.exists() or anc.is_symlink()) and anc != anc.parent:
        anc = anc.parent
    return anc


def check_writable(path: str | os.PathLike, *, flag: str = "--out", need_bytes: int = 0) -> None:
    """The folder that will hold ``path`` can be created and written, with ``need_bytes`` free: tried now
    (a temporary folder is made and removed), so a read-only disk fails before the work, not after it."""
    path = Path(path)
    anc = _existing_ancestor(path)
    if not anc.is_dir():
        raise OutputError(f"{flag} {path}: {anc} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".moe2edge-write-test-", dir=anc)
        os.rmdir(probe)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write in {anc} ({e.strerror}); choose a writable place") from None
    if need_bytes:
        free = shutil.disk_usage(anc).free
        if free < need_bytes:
            raise OutputError(f"{flag} {path}: needs about {need_bytes / 1e6:.0f} MB, only {free / 1e6:.0f} MB free "
                              f"on {anc}; free some space or write elsewhere")


def _check_inputs(path: Path, inputs, flag: str) -> None:
    rp = _resolved(path)
    for inp in inputs:
        if inp is None or str(inp) in ("", "-"):
            continue
        ri = _resolved(inp)
        if rp == ri:
            raise OutputError(f"{flag} {path} is also an input ({inp}): writing it would destroy the input; "
                              "choose another output path")
        if rp in ri.parents:
            raise OutputError(f"{flag} {path} contains the input {inp}: replacing it would delete the input; "
                              "choose another output path")


def _check_replaceable(path: Path, kinds, force: bool, flag: str) -> None:
    """An existing ``path`` (folder output) may be replaced: see the module docstring."""
    from moe2edge._integrity import folder_kind

    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        if not force:
            raise OutputError(f"{flag} {path} is an existing file, not a folder this tool wrote: refusing to "
                              f"replace it ({FORCE_HINT})")
        return
    kind, unlisted = folder_kind(path)
    if kind is None:
        if not any(path.iterdir()) or force:
            return
        raise OutputError(f"{flag} {path} is a folder this tool did not write (no moe2edge manifest): refusing to "
                          f"replace it and lose its files ({FORCE_HINT})")
    if kinds and kind not in kinds and not force:
        raise OutputError(f"{flag} {path} holds a moe2edge {kind}, not a{'n' if kinds[0][0] in 'aeiou' else ''} "
                          f"{' or '.join(kinds)}: refusing to replace it ({FORCE_HINT})")
    if unlisted and not force:
        shown = ", ".join(unlisted[:3]) + (f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else "")
        raise OutputError(f"{flag} {path} holds files this tool did not write ({shown}): refusing to replace "
                          f"the folder and lose them ({FORCE_HINT})")


def safe_output(path: str | os.PathLike, *, inputs=(), force: bool = False, kinds: tuple[str, ...] = (),
                folder: bool = True, flag: str = "--out", need_bytes: int = 0) -> Path:
    """Check that ``path`` may be written (see the module docstring); raise ``OutputError`` naming the flag.

    folder=True: ``path`` is a folder output replaced as a whole (kinds: what it may replace: "engine",
    "checkpoint", "student", "sentence-transformers"); folder=False: a file output (an existing regular
    file is overwritten, a folder is refused). Returns ``path``."""
    path = Path(path)
    if not folder and path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file path")
    _check_inputs(path, inputs, flag)
    if folder:
        _check_replaceable(path, tuple(kinds), force, flag)
    check_writable(path, flag=flag, need_bytes=need_bytes)
    return path


def output_folder(path: str | os.PathLike, *, inputs=(), flag: str = "--out") -> Path:
    """A folder that files are written INTO (not replaced as a whole): absent or a folder, writable."""
    path = Path(path)
    _check_inputs(path, inputs, flag)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; give a folder")
    check_writable(path / "x", flag=flag)
    return path


def input_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """An existing regular file, or one clear error saying what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, f"is a folder, expected a {what}", str(path))
    if not path.exists():
        raise FileNotFoundError(2, f"{what} not found", str(path))
    return path


def input_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(20, f"is a file, expected a {what}", str(path))
    if not path.exists():
        raise FileNotFoundError(2, f"{what} not found", str(path))
    return path


def _default_mode_dir(path: Path) -> None:
    """mkdtemp makes 0700 folders; a model folder is meant to be shared like any other mkdir'd one."""
    mask = os.umask(0)
    os.umask(mask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o777 & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = True, kinds: tuple[str, ...] = (), force: bool = False,
               inputs=()):
    """Yield a temporary sibling folder; on success it replaces ``path`` by rename, on error it is removed.

    An existing ``path`` is swapped out only after the new folder is complete, so a failure at any
    point leaves the previous content untouched and no half-built folder behind. ``path`` may be
    replaced only as ``safe_output(path, kinds=kinds, force=force, inputs=inputs)`` allows: checked on
    entry (before the work) and again just before the rename (something may have appeared meanwhile).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    safe_output(path, kinds=kinds, force=force, inputs=inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    _default_mode_dir(tmp)
    try:
        yield tmp
        _check_replaceable(path, tuple(kinds), force, "output")
        old = None
        if path.exists() or path.is_symlink():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a file, or of every file below a folder (0 for a path that does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; an output file is meant to be read like any other
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, *, atomic: bool = True) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    if atomic:
        atomic_write_text(path, text)
    else:
        Path(path).write_text(text, encoding="utf-8")


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file (cached per file state: ``moe2edge._integrity.file_sha256``)."""
    from moe2edge._integrity import file_sha256

    return file_sha256(path)


def read_json_file(path: str | os.PathLike, what: str = "file", *, expect: type | None = None):
    """Parse a JSON file; a missing file, a folder, bad JSON or (with ``expect=dict``) another JSON type is
    one clear error naming the path (and the line of a syntax error)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, f"is a folder, expected a {what} (JSON)", str(path))
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    if expect is not None and not isinstance(obj, expect):
        kind = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise ValueError(f"{path}: expected {kind} ({what}), got {type(obj).__name__}")
    return obj


def texts_sha256(texts: list[str]) -> str:
    """Identity of a list of texts (order matters): recorded in manifests for calibration/verification data."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
