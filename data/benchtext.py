"""Held-out real text of varying length for latency: what a new user's documents look like.

Engines pay for every new sequence length (OpenVINO compiles kernels per shape) and tokenizers cache
words, so timing one repeated 128-token text flatters both (issue 14: 20.8 ms on first sight vs 6.3 ms
for one repeated text). This set is the default input of ``moe2edge bench`` and ``moe2edge eval``'s latency.

Built once from the Debian lists in the data cache (``build_bench_texts``) and frozen under
``benchmarks/benchtext-v1/`` (``texts.jsonl.gz`` + ``manifest.json``):

* Units of the corpus builder's *test* split (``data/debian.split_units``: never in training), minus
  every unit that shares a source package, normalised text or MinHash band with this machine's installed
  package descriptions (calibration, INT8 probe and verification come from those: ``data/installed``).
  Test units are also where the frozen retrieval benchmark comes from; that is harmless for latency
  (the benchmark is only scored, never trained or calibrated on).
* The long description in English and its DDTP translations (every benchmark language), 110-225
  tokens with multilingual-e5-small's tokenizer (``<s>``/``</s>`` included), at most one text per
  near-duplicate group, so no two texts are siblings.
* Per language, half the texts from 110-128 tokens and half from 129-225: the median is ~128, the
  length of the fixed-shape number beside it.
* Every text is used once per model: ``split_for_latency`` hands out disjoint slices for warm-up,
  batch 1 and batch 32, interleaving languages.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path


DEFAULT_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "benchtext-v1"
MIN_TOKENS, MAX_TOKENS, MEDIAN_TOKENS = 110, 225, 128
PER_LANGUAGE = 30
SCHEMA = "moe2edge.benchtext/v1"


def build_bench_texts(lists_dir: str | Path, tokenizer_file: str | Path, *, status_file=None,
                      per_language: int = PER_LANGUAGE, seed: int = 13) -> tuple[list[dict], dict]:
    """-> (rows {text, language, tokens, group}, report). Deterministic for the same lists + tokenizer."""
    # The builder's imports stay here: the latency child imports this module for load_bench_texts only,
    # and the Debian readers would add ~2 MB to the peak RSS it reports.
    from tokenizers import Tokenizer as HFTokenizer

    from moe2edge.data.debian import BuildConfig, _rank, group_units, read_lists, split_units, unit_keys
    from moe2edge.data.installed import DPKG_STATUS, read_descriptions
    from moe2edge.data.textsets import _units

    cfg = BuildConfig()
    units, lists_manifest = read_lists(lists_dir, suite=cfg.suite)
    _, test, groups, _ = split_units(units, cfg)
    installed = _units(read_descriptions(status_file or DPKG_STATUS))
    # One grouping over test units + installed descriptions: a test unit in a group with any installed text
    # shares a source, a normalised text or a band with calibration / probe / verification text.
    keys = unit_keys(test + installed, cfg)
    roots = group_units(test + installed, keys)
    tainted = {roots[i] for i in range(len(test), len(test) + len(installed))}
    clean = [u for i, u in enumerate(test) if roots[i] not in tainted]
    tok = HFTokenizer.from_file(str(tokenizer_file))
    tok.no_truncation()
    tok.no_padding()
    langs = sorted({"en", *(lang for u in clean for lang in u.translations)})
    cands: dict[str, list[tuple[str, int, str]]] = {lang: [] for lang in langs}
    for u in clean:
        for lang in langs:
            text = u.long if lang == "en" else (u.translations.get(lang) or ("", ""))[1]
            if text and (lang == "en" or text != u.long):
                cands[lang].append((text, u.md5, groups[u.md5]))
    rows, used_groups, counts = [], set(), {}
    for lang in langs:
        items = sorted(cands[lang], key=lambda c: _rank(seed, f"benchtext:{lang}:{c[1]}"))
        lens = [len(e.ids) for e in tok.encode_batch([c[0] for c in items])] if items else []
        low, high = [], []
        for (text, md5, g), n in zip(items, lens):
            if g in used_groups or not MIN_TOKENS <= n <= MAX_TOKENS:
                continue
            band = low if n <= MEDIAN_TOKENS else high
            if len(band) < per_language // 2:
                band.append({"text": text, "language": lang, "tokens": n, "group": g})
                used_groups.add(g)
        if len(low) + len(high) < 4:  # too few held-out translations to say anything about the language
            for r in low + high:
                used_groups.discard(r["group"])
            continue
        counts[lang] = len(low) + len(high)
        rows.extend(low + high)
    rows.sort(key=lambda r: _rank(seed, "order:" + r["group"]))
    toks = sorted(r["tokens"] for r in rows)
    report = {"schema": SCHEMA, "seed": seed, "texts": len(rows), "per_language": counts,
              "tokens": {"min": toks[0], "median": toks[len(toks) // 2], "max": toks[-1]} if toks else {},
              "token_range": [MIN_TOKENS, MAX_TOKENS], "tokenizer": "multilingual-e5-small (XLM-R SentencePiece)",
              "tokenizer_sha256": hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest(),
              "source": {"lists": lists_manifest.get("release", {}).get("Date"), "split": "test units of "
                         "data/debian.split_units", "excluded_groups_with_installed_text": len(test) - len(clean),
                         "status_file": str(status_file or DPKG_STATUS)},
              "one_text_per_group": True}
    return rows, report


def write_bench_texts(out_dir: str | Path, rows: list[dict], report: dict) -> Path:
    from moe2edge._io import atomic_write_bytes
    from moe2edge.data.debian import _jsonl_bytes

    out = Path(out_dir)
    data = _jsonl_bytes(rows, gz=True)
    atomic_write_bytes(out / "texts.jsonl.gz", data)
    report = {**report, "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_bytes(out / "manifest.json", (json.dumps(report, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode())
    return out


def load_bench_texts(folder: str | Path = DEFAULT_DIR) -> list[dict]:
    """The frozen rows (``text``, ``language``, ``tokens``, ``group``), checked against the manifest's sha256."""
    folder = Path(folder)
    raw = (folder / "texts.jsonl.gz").read_bytes()
    want = json.loads((folder / "manifest.json").read_text()).get("sha256")
    if want and hashlib.sha256(raw).hexdigest() != want:
        raise ValueError(f"{folder / 'texts.jsonl.gz'}: sha256 differs from manifest.json; rebuild with "
                         "`python -m moe2edge.data.benchtext`")
    return [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line.strip()]


def split_for_latency(texts: list[str], *, batch_sizes=(1, 32), repeats: dict | None = None,
                      warmup: int = 2) -> dict:
    """Disjoint slices of ``texts``: {"warmup": [...], batch size: [batches]} so that no text is timed twice.
    ``repeats`` maps batch size to calls (default 20 at batch 1, 5 at batch 32); fewer calls when the set
    runs out (the count is what is reported)."""
    repeats = repeats or {1: 20, 32: 5}
    pos = 0
    out: dict = {"warmup": texts[:warmup]}
    pos = warmup
    for bs in batch_sizes:
        want = repeats.get(bs, 5)
        n = min(want, (len(texts) - pos) // bs)
        if n < 1:
            raise ValueError(f"{len(texts)} bench texts are too few for {want} calls at batch {bs} after the others")
        out[bs] = [texts[pos + i * bs: pos + (i + 1) * bs] for i in range(n)]
        pos += n * bs
    return out
