"""File hashes of the folders this tool writes, checked when they are loaded (one place for both).

Every folder moe2edge writes lists its files with size and sha256:

* engine folders (``moe2edge compile``): ``manifest.json`` -> ``identity.files`` (sha256) and
  ``identity.file_bytes``; the manifest itself is the only file not listed;
* checkpoints and students (``save_pretrained``, the static student's ``save``):
  ``moe2edge_files.json`` (``{"schema": "moe2edge.files/v1", "kind": ..., "files": {rel: {bytes, sha256}}}``),
  and their ``config.json`` says that it exists, so deleting the list does not make a folder unchecked.

Loading compares each listed file's size (free) and sha256 and refuses a mismatch naming the file
(:class:`IntegrityError`). A checkpoint this tool did not write (a released Hugging Face folder) has no
list: it loads as before, reported as "unsigned" at debug level. Files that are not listed (a user's
README) are not read by the loaders and are ignored here; ``safe_output`` does count them, so that a
folder holding them is not replaced.

Hashing is cached per file state, keyed by (path, size, mtime_ns, ctime_ns, inode, device), in this
process and on disk (``$MOE2EDGE_HASH_CACHE``, default ``~/.cache/moe2edge/file-hashes.json``,
``off`` disables it): a second load of a 2 GB checkpoint costs a ``stat``, not 2.5 s of sha256.
ctime cannot be set back by a user, so rewriting a file always invalidates its entry; a file changed
less than ``_RACY_S`` ago is never cached (timestamps are as coarse as a kernel tick: the same idea
as git's "racily clean" entries).

The check can be skipped explicitly: ``check=False`` on the loaders, or ``--skip-integrity-check``
on the CLI (which sets ``MOE2EDGE_SKIP_INTEGRITY_CHECK=1`` for the command and its subprocesses).
This module imports only the standard library (the torch-free runtime uses it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from moe2edge.errors import IntegrityError

log = logging.getLogger(__name__)

FILES_MANIFEST = "moe2edge_files.json"
FILES_SCHEMA = "moe2edge.files/v1"
ENGINE_MANIFEST = "manifest.json"
ENGINE_SCHEMA = "moe2edge.manifest/v1"  # = targets.build.MANIFEST_SCHEMA (not imported: that module is heavy)
SKIP_ENV = "MOE2EDGE_SKIP_INTEGRITY_CHECK"
CACHE_ENV = "MOE2EDGE_HASH_CACHE"
SKIP_HINT = "pass --skip-integrity-check to load it anyway"

# Folders written by moe2edge before file lists existed: what save_pretrained / the static student's
# save wrote. Such a folder counts as ours only if it holds nothing else (see ``folder_kind``).
LEGACY_CHECKPOINT_FILES = frozenset({
    "config.json", "model.safetensors", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "sentencepiece.bpe.model", "vocab.txt", "trainer_state.pt", "student_manifest.json", "history.json",
})

_RACY_S = 2.0  # files modified more recently than this are hashed every time
_CACHE_MIN_BYTES = 1 << 20  # smaller files hash faster than a cache lookup is worth
_CACHE_MAX_ENTRIES = 512
_memory: dict[str, tuple] = {}
_disk: dict | None = None


# ------------------------------------------------------------------------------------ hashing


def _state(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _cache_file() -> Path | None:
    v = os.environ.get(CACHE_ENV)
    if v and v.lower() in ("off", "0", "none", "no"):
        return None
    if v:
        return Path(v)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe2edge" / "file-hashes.json"


def _disk_cache() -> dict:
    global _disk
    if _disk is None:
        _disk = {}
        f = _cache_file()
        if f is not None and f.is_file():
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
                _disk = d if isinstance(d, dict) else {}
            except (OSError, ValueError):  # a broken cache is only a cache
                _disk = {}
    return _disk


def _save_disk_cache() -> None:
    f = _cache_file()
    if f is None or _disk is None:
        return
    items = sorted(_disk.items(), key=lambda kv: kv[1][-1])[-_CACHE_MAX_ENTRIES:]  # newest last
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(dict(items)), encoding="utf-8")
        os.replace(tmp, f)
    except OSError as e:  # a read-only home is not an error
        log.debug("hash cache %s not written: %s", f, e)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, cached per file state (see the module docstring)."""
    path = Path(path)
    key = os.path.realpath(path)
    st = os.stat(path)
    state = _state(st)
    hit = _memory.get(key)
    if hit is not None and list(hit[0]) == state:
        return hit[1]
    big = st.st_size >= _CACHE_MIN_BYTES
    if big:
        d = _disk_cache().get(key)
        if isinstance(d, list) and len(d) == 3 and d[0] == state:
            _memory[key] = (state, d[1])
            return d[1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    digest = h.hexdigest()
    now = time.time()
    if os.stat(path).st_ctime_ns == st.st_ctime_ns and now - st.st_mtime_ns / 1e9 > _RACY_S \
            and now - st.st_ctime_ns / 1e9 > _RACY_S:
        _memory[key] = (state, digest)
        if big:
            _disk_cache()[key] = [state, digest, now]
            _save_disk_cache()
    return digest


def file_records(folder: str | os.PathLike, *, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``folder`` (sorted, posix paths)."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    return out


def write_files_manifest(folder: str | os.PathLike, *, kind: str) -> dict:
    """List every file of ``folder`` (a temp folder about to be renamed into place) in ``FILES_MANIFEST``."""
    folder = Path(folder)
    m = {"schema": FILES_SCHEMA, "kind": kind, "files": file_records(folder, exclude=(FILES_MANIFEST,))}
    (folder / FILES_MANIFEST).write_text(json.dumps(m, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return m


# ------------------------------------------------------------------------------------ what a folder is


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _all_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def folder_kind(folder: str | os.PathLike) -> tuple[str | None, list[str]]:
    """``(kind, files it holds that its manifest does not list)`` for a folder moe2edge wrote, else
    ``(None, [])``. kind: "engine" | "checkpoint" | "student" | "sentence-transformers"."""
    folder = Path(folder)
    if not folder.is_dir():
        return None, []
    files = _all_files(folder)
    fm = _json(folder / FILES_MANIFEST)
    if isinstance(fm, dict) and fm.get("schema") == FILES_SCHEMA and isinstance(fm.get("files"), dict):
        listed = set(fm["files"]) | {FILES_MANIFEST}
        return str(fm.get("kind")), [f for f in files if f not in listed]
    em = _json(folder / ENGINE_MANIFEST)
    if isinstance(em, dict) and em.get("schema") == ENGINE_SCHEMA and (folder / "engine.json").is_file():
        listed = set((em.get("identity") or {}).get("files") or {}) | {ENGINE_MANIFEST}
        return "engine", [f for f in files if f not in listed]
    cfg = _json(folder / "config.json")
    if isinstance(cfg, dict) and ("moe2edge" in cfg or cfg.get("model_type") == "moe2edge_static"):
        kind = "student" if (folder / "student_manifest.json").is_file() or cfg.get("model_type") == "moe2edge_static" \
            else "checkpoint"
        return kind, [f for f in files if f not in LEGACY_CHECKPOINT_FILES]
    return None, []


# ------------------------------------------------------------------------------------ checking


def checks_enabled(check: bool | None = None) -> bool:
    """An explicit ``check`` wins; else on unless ``MOE2EDGE_SKIP_INTEGRITY_CHECK`` is set (by the CLI flag)."""
    if check is not None:
        return bool(check)
    return os.environ.get(SKIP_ENV, "").lower() not in ("1", "true", "yes")


def check_files(folder: Path, expected: dict[str, str | dict], *, manifest: str,
                sizes: dict[str, int] | None = None) -> dict:
    """Compare every listed file with its recorded size and sha256; raise ``IntegrityError`` naming the first
    file that differs. ``expected``: {rel: sha256} or {rel: {"sha256", "bytes"}}."""
    t0 = time.perf_counter()
    total = 0
    for rel, rec in expected.items():
        sha = rec.get("sha256") if isinstance(rec, dict) else rec
        size = rec.get("bytes") if isinstance(rec, dict) else (sizes or {}).get(rel)
        p = folder / rel
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise IntegrityError(f"{folder / manifest}: lists a file outside the folder ({rel!r})")
        if not p.is_file():
            raise IntegrityError(f"{p}: missing, but {manifest} lists it; the folder is incomplete ({SKIP_HINT})")
        n = p.stat().st_size
        if size is not None and n != size:
            raise IntegrityError(f"{p}: {n} bytes, but {manifest} records {size}: the file was changed or "
                                 f"truncated after it was written ({SKIP_HINT})")
        if not isinstance(sha, str) or file_sha256(p) != sha:
            raise IntegrityError(f"{p}: sha256 differs from the one in {manifest}: the file was changed after it "
                                 f"was written; rebuild it ({SKIP_HINT})")
        total += n
    return {"status": "verified", "manifest": manifest, "files": len(expected), "bytes": total,
            "seconds": round(time.perf_counter() - t0, 3)}


def check_folder(folder: str | os.PathLike, *, check: bool | None = None, required: bool = False) -> dict:
    """Check a folder against its file list. Returns ``{"status": "verified" | "skipped" | "unsigned", ...}``.

    ``required``: the folder says it was written by this tool (an engine, or a ``config.json`` that
    names ``FILES_MANIFEST``), so a missing list is an error, not "unsigned"."""
    folder = Path(folder)
    if not checks_enabled(check):
        # said loudly only when a user asked for it (the flag); a caller's check=False is deliberate (compile
        # verifies a folder before its manifest exists)
        (log.debug if check is False else log.warning)("%s: integrity check skipped (file hashes not compared)", folder)
        return {"status": "skipped"}
    fm_path, em_path = folder / FILES_MANIFEST, folder / ENGINE_MANIFEST
    if fm_path.is_file():
        fm = _json(fm_path)
        if not isinstance(fm, dict) or fm.get("schema") != FILES_SCHEMA or not isinstance(fm.get("files"), dict):
            raise IntegrityError(f"{fm_path}: not a valid file list (schema {FILES_SCHEMA}); {SKIP_HINT}")
        rep = check_files(folder, fm["files"], manifest=FILES_MANIFEST)
    elif (folder / "engine.json").is_file():
        if not em_path.is_file():
            raise IntegrityError(f"{em_path}: missing: an engine folder carries its file hashes there; rebuild it "
                                 f"with `moe2edge compile` ({SKIP_HINT})")
        em = _json(em_path)
        files = (em.get("identity") or {}).get("files") if isinstance(em, dict) else None
        if not isinstance(em, dict) or em.get("schema") != ENGINE_SCHEMA or not isinstance(files, dict) or not files:
            raise IntegrityError(f"{em_path}: not a valid engine manifest (schema {ENGINE_SCHEMA} with "
                                 f"identity.files); {SKIP_HINT}")
        if "engine.json" not in files:
            raise IntegrityError(f"{em_path}: does not list engine.json; {SKIP_HINT}")
        sizes = em["identity"].get("file_bytes")
        rep = check_files(folder, files, manifest=ENGINE_MANIFEST, sizes=sizes if isinstance(sizes, dict) else None)
    elif required:
        raise IntegrityError(f"{fm_path}: missing, but {folder / 'config.json'} says this folder was written with "
                             f"one; the folder is incomplete or was altered ({SKIP_HINT})")
    else:
        log.debug("%s: no file list (not written by moe2edge, e.g. a released checkpoint): files not checked", folder)
        return {"status": "unsigned"}
    log.debug("%s: %d files verified against %s in %.3f s", folder, rep["files"], rep["manifest"], rep["seconds"])
    return rep


def describe(report: dict | None) -> str:
    """One phrase for tables: 'files verified (3 files, sha256)', 'files NOT checked (skipped)', ..."""
    if not report:
        return "files: unknown"
    s = report.get("status")
    if s == "verified":
        return f"files verified ({report['files']} files, {report['bytes'] / 1e6:.1f} MB, sha256 vs {report['manifest']})"
    if s == "skipped":
        return "files NOT checked (--skip-integrity-check)"
    return "files not checked (no file list: not written by moe2edge)"
