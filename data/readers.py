"""Readers for the formats users already have: BEIR/MTEB retrieval folders and JSONL pairs/triplets.

Every reader checks each line and either raises ``MalformedInputError`` naming the file, the line
number and what is wrong (``strict=True``, the default), or skips the line and counts it
(``strict=False``); skipped lines are always logged with their count and first few reasons, never
dropped silently. ``.jsonl`` and ``.jsonl.gz`` are both accepted everywhere.

BEIR layout (https://github.com/beir-cellar/beir)::

    DIR/corpus.jsonl[.gz]    {"_id": ..., "title": ..., "text": ...}
    DIR/queries.jsonl[.gz]   {"_id": ..., "text": ..., optional "language"}
    DIR/qrels/test.tsv       query-id <TAB> corpus-id <TAB> score   (header line optional)

Pairs / triplets (one JSON object per line): ``{"query", "positive", "negatives": [...]}``; the
sentence-transformers names ``anchor`` / ``document`` / ``negative`` are accepted as aliases.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from moe2edge.errors import UserError

log = logging.getLogger(__name__)

_QUERY_KEYS = ("query", "anchor")
_POS_KEYS = ("positive", "document", "pos")
_NEG_KEYS = ("negatives", "negative", "neg")


class MalformedInputError(UserError, ValueError):
    """A line of an input file cannot be read; the message says file, line and why."""

    def __init__(self, path: str | Path, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


@dataclass
class ReadStats:
    """Lines read / skipped for one file (skips only happen with ``strict=False``)."""

    path: str
    read: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, line: int, reason: str, strict: bool) -> None:
        if strict:
            raise MalformedInputError(self.path, line, reason)
        self.skipped += 1
        if len(self.reasons) < 5:
            self.reasons.append(f"line {line}: {reason}")

    def log(self) -> None:
        if self.skipped:
            log.warning("%s: skipped %d malformed line(s) of %d, e.g. %s", self.path, self.skipped,
                        self.read + self.skipped, "; ".join(self.reasons))
        else:
            log.info("%s: read %d line(s)", self.path, self.read)


def _check_file(path: Path, what: str = "file") -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, f"is a folder, expected a {what}", str(path))
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


def _lines(path: Path):
    """Yield ``(line_number, text)``, decoding each line on its own so that a bad byte is reported at its
    real line (a text-mode reader decodes in 8 KB chunks and fails one chunk early, e.g. "line 0").
    Truncated or corrupt gzip is one error naming the line where reading stopped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    n = 0
    with opener(path, "rb") as f:
        try:
            for n, raw in enumerate(f, 1):
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise MalformedInputError(path, n, f"not valid UTF-8 (byte {e.start} of the line)") from None
        except (OSError, EOFError, zlib.error) as e:
            raise MalformedInputError(path, n + 1, f"cannot read the file ({e}): truncated or corrupt?") from None


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no {stem}.jsonl or {stem}.jsonl.gz (expected a BEIR folder)")


def iter_jsonl(path: str | Path, stats: ReadStats, *, strict: bool = True):
    """Yield ``(line_number, dict)`` for each non-blank line; bad JSON or non-objects are errors."""
    path = _check_file(path, "JSONL file")
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            stats.skip(n, f"invalid JSON ({e.msg} at column {e.colno})", strict)
            continue
        if not isinstance(obj, dict):
            stats.skip(n, f"expected a JSON object, got {type(obj).__name__}", strict)
            continue
        yield n, obj


def _text_field(obj: dict, key: str, n: int, stats: ReadStats, strict: bool, *, allow_empty=False):
    v = obj.get(key)
    if v is None:
        stats.skip(n, f"missing field {key!r} (fields: {sorted(obj)})", strict)
        return None
    if not isinstance(v, str):
        stats.skip(n, f"field {key!r} must be a string, got {type(v).__name__}", strict)
        return None
    if not allow_empty and not v.strip():
        stats.skip(n, f"field {key!r} is empty", strict)
        return None
    return v


# ------------------------------------------------------------------------------------- BEIR


@dataclass
class RetrievalDataset:
    """A BEIR-style retrieval set held in memory (ids are strings; dicts keep file order)."""

    name: str
    corpus: dict[str, dict]  # doc id -> {"title", "text"}
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    languages: dict[str, str] = field(default_factory=dict)  # query id -> language ("" if unknown)
    manifest: dict | None = None

    def doc_texts(self, ids: list[str] | None = None) -> list[str]:
        """Title and text joined the BEIR way ("title text"), for the given or all doc ids."""
        ids = list(self.corpus) if ids is None else ids
        return [(self.corpus[i]["title"] + " " + self.corpus[i]["text"]).strip() for i in ids]


def read_corpus(path: str | Path, *, strict: bool = True) -> dict[str, dict]:
    stats = ReadStats(str(path))
    corpus: dict[str, dict] = {}
    for n, obj in iter_jsonl(path, stats, strict=strict):
        did = obj.get("_id", obj.get("id"))
        if did is None or isinstance(did, (dict, list)):
            stats.skip(n, "missing field '_id'", strict)
            continue
        text = _text_field(obj, "text", n, stats, strict, allow_empty=True)
        if text is None:
            continue
        title = obj.get("title") or ""
        if not isinstance(title, str):
            stats.skip(n, "field 'title' must be a string", strict)
            continue
        if str(did) in corpus:
            stats.skip(n, f"duplicate document id {did!r}", strict)
            continue
        corpus[str(did)] = {"title": title, "text": text}
        stats.read += 1
    stats.log()
    return corpus


def read_queries(path: str | Path, *, strict: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """``(queries, languages)``; the language comes from a ``language`` / ``lang`` field if present."""
    stats = ReadStats(str(path))
    queries, langs = {}, {}
    for n, obj in iter_jsonl(path, stats, strict=strict):
        qid = obj.get("_id", obj.get("id"))
        if qid is None or isinstance(qid, (dict, list)):
            stats.skip(n, "missing field '_id'", strict)
            continue
        text = _text_field(obj, "text", n, stats, strict)
        if text is None:
            continue
        if str(qid) in queries:
            stats.skip(n, f"duplicate query id {qid!r}", strict)
            continue
        queries[str(qid)] = text
        langs[str(qid)] = str(obj.get("language", obj.get("lang", "")) or "")
        stats.read += 1
    stats.log()
    return queries, langs


def read_qrels(path: str | Path, *, strict: bool = True) -> dict[str, dict[str, int]]:
    """TSV ``query-id corpus-id score`` (BEIR) or 4-column TREC ``qid 0 docid rel``; header optional."""
    path = _check_file(path, "qrels TSV file")
    stats = ReadStats(str(path))
    qrels: dict[str, dict[str, int]] = {}
    for n, line in _lines(path):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t") if "\t" in line else line.split()
        if n == 1 and parts[0].strip().lower() in ("query-id", "qid", "query_id"):
            continue
        if len(parts) == 4:  # TREC: qid iter docid rel
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            stats.skip(n, f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(parts)}", strict)
            continue
        qid, did, score = (p.strip() for p in parts)
        try:
            rel = int(float(score))
        except (ValueError, OverflowError):  # "x", "nan", "inf"
            stats.skip(n, f"score {score!r} is not a number", strict)
            continue
        qrels.setdefault(qid, {})[did] = rel
        stats.read += 1
    stats.log()
    return qrels


def load_beir(folder: str | Path, *, split: str = "test", strict: bool = True) -> RetrievalDataset:
    """Load a BEIR/MTEB folder (corpus, queries, ``qrels/<split>.tsv``); ``manifest.json`` if present."""
    folder = Path(folder)
    if folder.is_file():
        raise NotADirectoryError(20, "is a file, expected a BEIR dataset folder (corpus, queries, qrels/)", str(folder))
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {folder}")
    qrels_path = next((p for p in (folder / "qrels" / f"{split}.tsv", folder / "qrels" / f"{split}.tsv.gz")
                       if p.is_file()), None)
    if qrels_path is None:
        raise FileNotFoundError(f"{folder}: no qrels/{split}.tsv (expected a BEIR folder)")
    corpus = read_corpus(_find(folder, "corpus"), strict=strict)
    queries, langs = read_queries(_find(folder, "queries"), strict=strict)
    qrels = read_qrels(qrels_path, strict=strict)
    manifest = None
    if (folder / "manifest.json").is_file():
        from moe2edge._io import read_json_file

        manifest = read_json_file(folder / "manifest.json", "benchmark manifest", expect=dict)
    return RetrievalDataset(name=folder.name, corpus=corpus, queries=queries, qrels=qrels, languages=langs,
                            manifest=manifest)


# ------------------------------------------------------------------------- pairs and triplets


@dataclass(frozen=True)
class Pair:
    """A training example: query, positive document, optional hard negatives."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    language: str = ""


def subsample(ds: RetrievalDataset, *, max_queries: int | None = None, max_docs: int | None = None,
              seed: int = 0) -> RetrievalDataset:
    """A fixed, smaller copy of ``ds`` for quick runs: the first ``max_queries`` judged queries per language
    (file order), and a corpus of every document those queries judge plus a seeded sample of the others,
    ``max_docs`` in all (at least the judged ones). Deterministic; ``ds`` is left as it is."""
    import random

    queries = dict(ds.queries)
    if max_queries:
        seen: dict[str, int] = {}
        queries = {}
        for qid, text in ds.queries.items():
            lang = ds.languages.get(qid, "")
            if qid in ds.qrels and seen.get(lang, 0) < max_queries:
                seen[lang] = seen.get(lang, 0) + 1
                queries[qid] = text
    corpus = ds.corpus
    if max_docs and max_docs < len(ds.corpus):
        judged = {d for q in queries for d, r in ds.qrels.get(q, {}).items() if r > 0 and d in ds.corpus}
        others = [d for d in ds.corpus if d not in judged]
        extra = set(random.Random(seed).sample(others, max(0, min(len(others), max_docs - len(judged)))))
        corpus = {d: v for d, v in ds.corpus.items() if d in judged or d in extra}  # file order kept
    return RetrievalDataset(name=ds.name, corpus=corpus, queries=queries,
                            qrels={q: r for q, r in ds.qrels.items() if q in queries},
                            languages={q: ds.languages[q] for q in queries if q in ds.languages},
                            manifest=ds.manifest)


def _first(obj: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in obj:
            return k
    return None


def iter_pairs(path: str | Path, *, strict: bool = True):
    """Yield ``Pair`` from a JSONL[.gz] of pairs or triplets (aliases: anchor/document/negative)."""
    stats = ReadStats(str(path))
    for n, obj in iter_jsonl(path, stats, strict=strict):
        qk, pk = _first(obj, _QUERY_KEYS), _first(obj, _POS_KEYS)
        if qk is None or pk is None:
            missing = "query (or anchor)" if qk is None else "positive (or document)"
            stats.skip(n, f"missing field {missing}; fields: {sorted(obj)}", strict)
            continue
        q = _text_field(obj, qk, n, stats, strict)
        p = q is not None and _text_field(obj, pk, n, stats, strict)
        if q is None or not p:
            continue
        nk = _first(obj, _NEG_KEYS)
        negs = obj.get(nk, []) if nk else []
        if isinstance(negs, str):
            negs = [negs]
        if not isinstance(negs, list) or not all(isinstance(x, str) for x in negs):
            stats.skip(n, f"field {nk!r} must be a string or a list of strings", strict)
            continue
        stats.read += 1
        yield Pair(query=q, positive=p, negatives=tuple(negs), language=str(obj.get("language", "")))
    stats.log()


def read_pairs(path: str | Path, *, strict: bool = True) -> list[Pair]:
    return list(iter_pairs(path, strict=strict))
