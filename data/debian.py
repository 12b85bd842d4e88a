"""Real multilingual text from Debian's package lists: training pairs + a BEIR retrieval benchmark.

Debian ships every binary package's description as a one-line *short* description plus a *long*
paragraph, and volunteers translate both (DDTP). That gives, fully offline once the lists are
fetched, natural (query = short line, document = long text) pairs in English and ~15 languages, and
cross-lingual pairs (translated short line -> English long text).

Pipeline (``build_debian(lists_dir=..., out_dir=...)``):

1. ``fetch_lists`` runs ``apt-get update`` into a PRIVATE lists dir (the system lists are never
   touched; the image sets ``Acquire::Languages "none"`` so languages are passed explicitly). One
   suite only: bookworm and trixie share ~53k descriptions, so mixing suites would leak test text.
2. ``read_lists`` parses ``Packages`` (Package, Source, short Description, Description-md5) and
   ``i18n/Translation-*`` (Description-md5 -> short + long per language). One *description unit*
   per Description-md5 (many binaries share one text).
3. Filtering (``_keep``): a long text of at least ``min_words`` words; no transitional/dummy packages.
4. Grouping (union-find over units) by: source package, normalised long text, normalised short
   text, and MinHash LSH band keys of word shingles (near-duplicate / templated text: -dev/-doc
   siblings, rust crates, hunspell dictionaries...). A group never crosses the split.
5. Split by group with a seeded hash; groups larger than ``max_test_group`` (template floods) stay
   in train. ``leakage_check`` recomputes every key and counts test units whose source, normalised
   text or LSH band key appears in train: it must be 0 and the build fails otherwise.
6. Outputs (sorted, ``json.dumps(sort_keys=True)``, gzip with mtime=0): the same lists give
   byte-identical files. ``manifest.json`` records each list's file name, sha256 (checked against
   the ``InRelease`` SHA256 table) and the Release ``Date``, so a benchmark can be frozen.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import logging
import lzma
import re
import shutil
import subprocess
import unicodedata
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moe2edge._io import atomic_write_bytes

log = logging.getLogger(__name__)

MIRROR = "http://deb.debian.org/debian"
# Languages with a DDTP translation in bookworm main (counts in docs/benchmarks.md). Debian's codes.
LANGUAGES = (
    "en", "da", "it", "fr", "de", "sk", "pt_BR", "ja", "ko", "uk", "pl", "ru", "cs", "es", "pt",
    "zh_CN", "nl", "fi", "sv", "hu", "zh_TW", "vi", "id", "tr",
)
# Packages that exist only to pull in another package carry no description of their own.
_BOILERPLATE = re.compile(r"transitional (dummy )?package|dummy (transitional )?package", re.I)
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class BuildConfig:
    """Knobs of one build; stored in the manifest so a benchmark can be rebuilt exactly."""

    suite: str = "bookworm"
    seed: int = 13
    min_words: int = 12  # long texts shorter than this are mostly "This package contains X."
    test_fraction: float = 0.10  # of groups
    max_test_group: int = 12  # larger groups are template floods: train only
    shingle: int = 4  # words per shingle for MinHash
    num_perm: int = 64  # MinHash permutations = bands * rows
    bands: int = 16  # 16 x 4 rows: pairs with Jaccard ~0.5 collide in a band w.p. ~0.64, 0.7 -> 0.99
    max_corpus: int = 5000  # benchmark corpus (one representative unit per test group)
    max_queries_en: int = 1000
    max_queries_per_lang: int = 300
    min_queries_per_lang: int = 30  # languages with fewer test translations are left out
    max_train_en: int = 30000
    max_train_per_lang: int = 5000  # per language and per kind (mono / cross)
    max_train_per_group: int = 2  # templated groups must not dominate training


@dataclass
class Unit:
    """One unique English description (key: Description-md5) and the binaries that carry it."""

    md5: str
    short: str
    long: str
    packages: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    translations: dict[str, tuple[str, str]] = field(default_factory=dict)  # lang -> (short, long)


# ----------------------------------------------------------------------------------- fetching


def apt_command(lists_dir: Path, *, suite: str = "bookworm", languages=LANGUAGES, mirror: str = MIRROR):
    """The ``apt-get update`` command line that fills ``lists_dir`` and nothing else."""
    lists_dir = Path(lists_dir).resolve()
    root = lists_dir.parent
    return [
        "apt-get", "-q",
        f"-o=Dir::State::Lists={lists_dir}",
        f"-o=Dir::Cache={root / 'apt-cache'}",
        f"-o=Dir::Etc::SourceList={root / 'sources.list'}",
        "-o=Dir::Etc::SourceParts=/nonexistent",  # ignore /etc/apt/sources.list.d
        "-o=Acquire::GzipIndexes=false",  # store lists uncompressed (image default is lz4)
        f"-o=Acquire::Languages={','.join(languages)}",
        "-o=APT::Architectures=amd64",
        "update",
    ], f"deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main\n"


def fetch_lists(lists_dir: str | Path, *, suite: str = "bookworm", languages=LANGUAGES) -> Path:
    """Download ``suite`` main amd64 ``Packages`` + translations into a private ``lists_dir``."""
    lists_dir = Path(lists_dir).resolve()
    if shutil.which("apt-get") is None:
        raise FileNotFoundError("apt-get not found: fetch the lists on a Debian machine, or pass --lists DIR")
    cmd, sources = apt_command(lists_dir, suite=suite, languages=languages)
    (lists_dir / "partial").mkdir(parents=True, exist_ok=True)
    (lists_dir.parent / "apt-cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (lists_dir.parent / "sources.list").write_text(sources)
    log.info("fetching %s lists: %s", suite, " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"apt-get update failed ({res.returncode}): {res.stderr.strip()[-800:]}")
    return lists_dir


# ------------------------------------------------------------------------------------ parsing


def read_list_bytes(path: Path) -> bytes:
    """Raw (decompressed) bytes of a list file stored plain, .gz, .xz, .bz2, .lz4 or .zst."""
    data = Path(path).read_bytes()
    name = str(path)
    if name.endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:  # truncated download, not a gzip file
            raise ValueError(f"{path}: corrupt or truncated gzip file ({e}); fetch the lists again") from None
    if name.endswith(".xz"):
        try:
            return lzma.decompress(data)
        except (EOFError, lzma.LZMAError) as e:
            raise ValueError(f"{path}: corrupt or truncated xz file ({e}); fetch the lists again") from None
    if name.endswith(".bz2"):
        try:
            return bz2.decompress(data)
        except (EOFError, OSError) as e:
            raise ValueError(f"{path}: corrupt or truncated bz2 file ({e}); fetch the lists again") from None
    if name.endswith((".lz4", ".zst")):  # apt's own decompressor (no python lz4/zstd needed)
        return subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", name], check=True, capture_output=True).stdout
    return data


def iter_stanzas(text: str):
    """deb822 stanzas as ``{field: value}``; continuation lines keep their leading space."""
    fields: dict[str, str] = {}
    key = None
    for line in text.split("\n"):
        if not line.strip():
            if fields:
                yield fields
            fields, key = {}, None
        elif line[0] in " \t" and key is not None:
            fields[key] += "\n" + line
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    if fields:
        yield fields


def split_description(value: str) -> tuple[str, str]:
    """(short, long) from a Description field; long text per Debian Policy 5.6.13.

    A line " ." is a paragraph break; lines with two leading spaces are verbatim (kept on their
    own line, e.g. bullet lists); other lines are word-wrapped prose joined with spaces.
    """
    first, *rest = value.split("\n")
    paras: list[str] = []
    cur = ""
    for raw in rest:
        line = raw[1:] if raw.startswith(" ") else raw
        if line.strip() == ".":
            paras.append(cur)
            cur = ""
        elif line.startswith((" ", "\t")):
            cur = (cur + "\n" if cur else "") + line.strip()
        else:
            cur = (cur + " " if cur else "") + line.strip()
    paras.append(cur)
    return first.strip(), "\n".join(p.strip() for p in paras if p.strip())


def _list_files(lists_dir: Path, suite: str) -> tuple[Path, Path, dict[str, Path]]:
    files = sorted(p for p in Path(lists_dir).iterdir() if p.is_file())
    suites = {m.group(1) for p in files if (m := re.search(r"_dists_([^_]+)_", p.name))}
    if suites and suites != {suite}:
        raise ValueError(f"{lists_dir} holds lists of several suites {sorted(suites)}: use one suite only "
                         f"(they share descriptions, so mixing them leaks test text into training)")
    release = [p for p in files if re.search(r"_dists_[^_]+_(In)?Release$", p.name)]
    packages = [p for p in files if re.search(r"_main_binary-amd64_Packages(\.\w+)?$", p.name)]
    if len(packages) != 1:
        raise FileNotFoundError(f"expected one main/binary-amd64 Packages list in {lists_dir}, found {len(packages)}"
                                " (fetch with `moe2edge data build`, or point --lists at apt's lists dir)")
    trans = {}
    for p in files:
        if m := re.search(r"_i18n_Translation-([A-Za-z_%0-9]+?)(\.\w+)?$", p.name):
            trans[m.group(1).replace("%5f", "_").replace("%5F", "_")] = p
    if "en" not in trans:
        raise FileNotFoundError(f"no Translation-en in {lists_dir}: the long English texts live there "
                                "(fetch with Acquire::Languages including 'en')")
    return (release[0] if release else None), packages[0], trans


def _release_info(path: Path | None) -> tuple[dict, dict[str, str]]:
    if path is None:
        return {}, {}
    text = read_list_bytes(path).decode("utf-8", "replace")
    head = next(iter_stanzas(text.replace("-----BEGIN PGP SIGNED MESSAGE-----\n", "").split("\n\n", 1)[-1]), {})
    info = {k: head[k] for k in ("Origin", "Suite", "Codename", "Version", "Date") if k in head}
    sha = {}
    for line in head.get("SHA256", "").split("\n"):
        parts = line.split()
        if len(parts) == 3:
            sha[parts[2]] = parts[0]
    return info, sha


def read_lists(lists_dir: str | Path, *, suite: str = "bookworm", languages=LANGUAGES):
    """Parse a lists dir into ``({md5: Unit}, manifest_lists)``; verifies sha256 against InRelease."""
    lists_dir = Path(lists_dir)
    if not lists_dir.is_dir():
        raise FileNotFoundError(f"lists dir not found: {lists_dir}")
    release, packages_path, trans_paths = _list_files(lists_dir, suite)
    release_info, release_sha = _release_info(release)
    if release_info.get("Codename", suite) != suite:
        raise ValueError(f"{release.name} is codename {release_info.get('Codename')!r}, expected {suite!r}")
    files = []

    def load(path: Path, release_name: str) -> str:
        data = read_list_bytes(path)
        digest = hashlib.sha256(data).hexdigest()
        expected = release_sha.get(release_name)
        if expected is not None and expected != digest:
            raise ValueError(f"{path.name}: sha256 {digest} does not match {release.name} ({expected})")
        files.append({"file": path.name, "release_path": release_name, "sha256": digest, "bytes": len(data),
                      "verified_against_release": expected is not None})
        return data.decode("utf-8")

    units: dict[str, Unit] = {}
    short_by_md5: dict[str, str] = {}
    for st in iter_stanzas(load(packages_path, "main/binary-amd64/Packages")):
        md5 = st.get("Description-md5")
        if not md5 or "Description" not in st:
            continue
        pkg = st["Package"]
        src = st.get("Source", pkg).split(" ")[0]  # "foo (1.2-3)" -> "foo"
        u = units.setdefault(md5, Unit(md5=md5, short="", long=""))
        u.packages.append(pkg)
        u.sources.append(src)
        short_by_md5[md5] = split_description(st["Description"])[0]
    for lang in [x for x in languages if x in trans_paths]:
        rel = f"main/i18n/Translation-{lang}"
        for st in iter_stanzas(load(trans_paths[lang], rel)):
            md5 = st.get("Description-md5")
            value = st.get(f"Description-{lang}")
            if md5 not in units or value is None:
                continue
            short, long = split_description(value)
            if lang == "en":
                units[md5].short, units[md5].long = short, long
            else:
                units[md5].translations.setdefault(lang, (short, long))
    for u in units.values():
        u.packages = sorted(set(u.packages))
        u.sources = sorted(set(u.sources))
        if not u.short:
            u.short = short_by_md5.get(u.md5, "")
    manifest = {"suite": suite, "release": release_info, "release_file": release.name if release else None,
                "files": sorted(files, key=lambda f: f["file"])}
    log.info("parsed %d description units from %s (%s %s)", len(units), lists_dir,
             release_info.get("Codename", suite), release_info.get("Date", "?"))
    return units, manifest


# ------------------------------------------------------------------------ dedup and splitting


def normalise(text: str) -> str:
    """Case-, accent-width- and punctuation-insensitive form used for exact-duplicate keys."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).lower()))


def _h(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def minhash_bands(texts: list[str], cfg: BuildConfig) -> np.ndarray:
    """(N, bands) uint64 LSH band keys of word-shingle MinHash signatures; deterministic (crc32, seeded)."""
    rows = cfg.num_perm // cfg.bands
    rng = np.random.default_rng(cfg.seed)
    prime = np.uint64((1 << 61) - 1)
    a = rng.integers(1, 1 << 32, cfg.num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, cfg.num_perm, dtype=np.uint64)
    from tqdm.auto import tqdm

    hashes, offsets = [], [0]
    for t in tqdm(texts, desc="minhash", unit="doc", disable=len(texts) < 5000):
        w = normalise(t).split()
        sh = {" ".join(w[i:i + cfg.shingle]) for i in range(max(1, len(w) - cfg.shingle + 1))}
        hashes.extend(zlib.crc32(s.encode("utf-8")) for s in sorted(sh))
        offsets.append(len(hashes))
    h = np.asarray(hashes, dtype=np.uint64)
    starts = np.asarray(offsets[:-1])
    sig = np.empty((len(texts), cfg.num_perm), dtype=np.uint64)
    for p in range(cfg.num_perm):  # a*h + b < 2^64 since a, h, b < 2^32
        sig[:, p] = np.minimum.reduceat((a[p] * h + b[p]) % prime, starts)
    # one 64-bit key per band: hash the band's rows (band index mixed in so bands never collide)
    keys = np.empty((len(texts), cfg.bands), dtype=np.uint64)
    for band in range(cfg.bands):
        chunk = np.ascontiguousarray(sig[:, band * rows:(band + 1) * rows])
        keys[:, band] = [int.from_bytes(hashlib.blake2b(bytes([band]) + r.tobytes(), digest_size=8).digest(), "little")
                         for r in chunk]
    return keys


def unit_keys(units: list[Unit], cfg: BuildConfig) -> list[list[str]]:
    """Every key that makes two units 'the same' for splitting purposes."""
    bands = minhash_bands([u.long for u in units], cfg)
    out = []
    for u, bk in zip(units, bands):
        keys = [f"src:{s}" for s in u.sources]
        keys.append(f"long:{_h(normalise(u.long))}")
        keys.append(f"short:{_h(normalise(u.short))}")
        keys.extend(f"band:{int(k):016x}" for k in bk)
        out.append(keys)
    return out


def group_units(units: list[Unit], keys: list[list[str]]) -> list[int]:
    """Union-find over shared keys; returns a group id (index of the group's root unit) per unit."""
    parent = list(range(len(units)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, ks in enumerate(keys):
        for k in ks:
            j = first.setdefault(k, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)  # deterministic: smallest index is the root
    return [find(i) for i in range(len(units))]


def _keep(u: Unit, cfg: BuildConfig) -> bool:
    if not u.short or not u.long or len(_WORD.findall(u.long)) < cfg.min_words:
        return False
    return not (_BOILERPLATE.search(u.short) or _BOILERPLATE.search(u.long))


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def leakage_check(train: list[Unit], test: list[Unit], cfg: BuildConfig) -> dict:
    """Recompute every split key from scratch and count test units that share one with train."""
    all_keys = unit_keys(train + test, cfg)
    train_keys = set().union(*all_keys[:len(train)]) if train else set()
    counts = Counter()
    for ks in all_keys[len(train):]:
        hit = {k.split(":")[0] for k in ks if k in train_keys}
        for kind in ("src", "long", "short", "band"):
            counts[kind] += kind in hit
        counts["any"] += bool(hit)
    return {"test_units": len(test), "train_units": len(train),
            "test_units_sharing_source_with_train": counts["src"],
            "test_units_with_normalised_long_text_in_train": counts["long"],
            "test_units_with_normalised_short_text_in_train": counts["short"],
            "test_units_with_minhash_band_in_train": counts["band"],
            "test_units_leaking": counts["any"]}


# ----------------------------------------------------------------------------------- writing


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _jsonl_bytes(rows: list[dict], gz: bool) -> bytes:
    raw = "".join(_dumps(r) + "\n" for r in rows).encode("utf-8")
    if not gz:
        return raw
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:  # mtime=0: reproducible
        f.write(raw)
    return buf.getvalue()


def write_beir(out: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple[str, str, int]],
               *, gz: bool = True) -> dict[str, str]:
    """Write a BEIR folder (corpus/queries JSONL[.gz], qrels/test.tsv); returns {relative path: sha256}."""
    ext = ".jsonl.gz" if gz else ".jsonl"
    files = {f"corpus{ext}": _jsonl_bytes(corpus, gz), f"queries{ext}": _jsonl_bytes(queries, gz),
             "qrels/test.tsv": ("query-id\tcorpus-id\tscore\n" +
                                "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)).encode()}
    for rel, data in files.items():
        atomic_write_bytes(out / rel, data)
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


# ------------------------------------------------------------------------------------ building


def split_units(units: dict[str, Unit], cfg: BuildConfig):
    """Filter, group and split; returns (train, test, groups {unit md5: group key}, stats)."""
    kept = [units[m] for m in sorted(units) if _keep(units[m], cfg)]
    log.info("kept %d / %d units after filtering (min %d words, no transitional/dummy)",
             len(kept), len(units), cfg.min_words)
    keys = unit_keys(kept, cfg)
    roots = group_units(kept, keys)
    members: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(roots):
        members[r].append(i)
    group_key = {r: kept[r].md5 for r in members}  # smallest md5 in the group (kept is md5-sorted)
    train, test = [], []
    n_test_groups = 0
    for r, idx in sorted(members.items(), key=lambda kv: group_key[kv[0]]):
        u = int(_rank(cfg.seed, group_key[r])[:8], 16) / 0xFFFFFFFF
        is_test = len(idx) <= cfg.max_test_group and u < cfg.test_fraction
        n_test_groups += is_test
        (test if is_test else train).extend(kept[i] for i in idx)
    sizes = Counter(len(v) for v in members.values())
    stats = {"units_total": len(units), "units_kept": len(kept), "groups": len(members),
             "largest_group": max(sizes) if sizes else 0,
             "groups_over_max_test_group": sum(c for s, c in sizes.items() if s > cfg.max_test_group),
             "test_groups": n_test_groups}
    groups = {kept[i].md5: group_key[r] for i, r in enumerate(roots)}
    return train, test, groups, stats


def _representative(units: list[Unit]) -> Unit:
    """The group's 'main' package: one named like its source, else the shortest name."""
    def key(u: Unit):
        return (not (set(u.packages) & set(u.sources)), min(len(p) for p in u.packages), u.md5)
    return min(units, key=key)


def _translated_short(u: Unit, lang: str) -> str | None:
    t = u.translations.get(lang)
    if not t or not t[0] or normalise(t[0]) == normalise(u.short):  # untranslated copies are not cross-lingual
        return None
    return t[0]


def build_benchmark(test: list[Unit], groups: dict[str, str], cfg: BuildConfig):
    """(corpus, queries, qrels, counts): one representative per test group, English corpus."""
    by_group: dict[str, list[Unit]] = defaultdict(list)
    for u in test:
        by_group[groups[u.md5]].append(u)
    reps = sorted((_representative(v) for v in by_group.values()), key=lambda u: _rank(cfg.seed, "corpus:" + u.md5))
    reps = sorted(reps[:cfg.max_corpus], key=lambda u: u.md5)
    corpus = [{"_id": u.md5, "title": "", "text": u.long, "package": u.packages[0]} for u in reps]
    queries, qrels, counts = [], [], {}
    order = sorted(reps, key=lambda u: _rank(cfg.seed, "query:" + u.md5))
    for lang in LANGUAGES:
        cap = cfg.max_queries_en if lang == "en" else cfg.max_queries_per_lang
        picked = []
        for u in order:
            text = u.short if lang == "en" else _translated_short(u, lang)
            if text:
                picked.append((u, text))
            if len(picked) == cap:
                break
        if lang != "en" and len(picked) < cfg.min_queries_per_lang:
            continue
        counts[lang] = len(picked)
        for u, text in sorted(picked, key=lambda p: p[0].md5):
            qid = f"{lang}-{u.md5}"
            queries.append({"_id": qid, "text": text, "language": lang})
            qrels.append((qid, u.md5, 1))
    return corpus, queries, qrels, counts


def build_pairs(train: list[Unit], groups: dict[str, str], cfg: BuildConfig) -> tuple[list[dict], dict]:
    """Training pairs: en (short->long), per language mono (short_L->long_L) and cross (short_L->long_en)."""
    per_group: dict[str, list[Unit]] = defaultdict(list)
    for u in sorted(train, key=lambda u: _rank(cfg.seed, "train:" + u.md5)):
        per_group[groups[u.md5]].append(u)
    chosen = sorted((u for v in per_group.values() for u in v[:cfg.max_train_per_group]),
                    key=lambda u: _rank(cfg.seed, "pair:" + u.md5))
    rows, counts = [], {}
    for lang in LANGUAGES:
        kinds = {"mono": [], "cross": []} if lang != "en" else {"mono": []}
        for u in chosen:
            if lang == "en":
                kinds["mono"].append({"query": u.short, "positive": u.long})
                continue
            short = _translated_short(u, lang)
            if short is None:
                continue
            if u.translations[lang][1]:
                kinds["mono"].append({"query": short, "positive": u.translations[lang][1]})
            kinds["cross"].append({"query": short, "positive": u.long})
        cap = cfg.max_train_en if lang == "en" else cfg.max_train_per_lang
        for kind, items in kinds.items():
            items = items[:cap]
            if not items:
                continue
            counts[f"{lang}/{kind}"] = len(items)
            rows.extend({**r, "language": lang, "kind": kind} for r in items)
    return rows, counts


def build_debian(*, lists_dir: str | Path, out_dir: str | Path, benchmark_dir: str | Path | None = None,
                 cfg: BuildConfig = BuildConfig()) -> dict:
    """Build ``out_dir/train/pairs.jsonl`` and a BEIR benchmark from a lists dir; returns the manifest.

    ``benchmark_dir`` defaults to ``out_dir/benchmark``. Raises ``RuntimeError`` if the leakage
    check finds any test unit sharing a split key with train.
    """
    out_dir = Path(out_dir)
    bench_dir = Path(benchmark_dir) if benchmark_dir else out_dir / "benchmark"
    units, lists_manifest = read_lists(lists_dir, suite=cfg.suite)
    train, test, groups, stats = split_units(units, cfg)
    leak = leakage_check(train, test, cfg)
    log.info("leakage check: %s", leak)
    if leak["test_units_leaking"]:
        raise RuntimeError(f"leakage check failed: {leak}")
    corpus, queries, qrels, q_counts = build_benchmark(test, groups, cfg)
    pairs, p_counts = build_pairs(train, groups, cfg)
    translated = Counter(lang for u in units.values() for lang in u.translations)

    bench_files = write_beir(bench_dir, corpus, queries, qrels, gz=True)
    pairs_bytes = _jsonl_bytes(pairs, gz=False)
    atomic_write_bytes(out_dir / "train" / "pairs.jsonl", pairs_bytes)
    from moe2edge import __version__

    manifest = {
        "name": f"debian-{cfg.suite}", "builder": f"moe2edge {__version__} moe2edge.data.debian",
        "config": asdict(cfg), "lists": lists_manifest, "stats": stats, "leakage": leak,
        "translations_available": dict(sorted(translated.items())),
        "benchmark": {"corpus_docs": len(corpus), "queries_per_language": q_counts, "qrels": len(qrels),
                      "files": bench_files},
        "train": {"pairs": len(pairs), "pairs_per_language_kind": p_counts,
                  "sha256": hashlib.sha256(pairs_bytes).hexdigest()},
    }
    data = (json.dumps(manifest, ensure_ascii=False, sort_keys=True, indent=2) + "\n").encode()
    atomic_write_bytes(bench_dir / "manifest.json", data)
    atomic_write_bytes(out_dir / "manifest.json", data)
    return manifest


# ------------------------------------------------------------------------------------ fixture


def _stanza_text(st: dict[str, str], fields: tuple[str, ...]) -> str:
    return "".join(f"{k}: {st[k]}\n" for k in fields if k in st)


def make_fixture_lists(lists_dir: str | Path, out_dir: str | Path, *, n_sources: int = 24, seed: int = 13,
                       langs: tuple[str, ...] = ("en", "de", "fr", "ja")) -> list[Path]:
    """Cut a small gzipped lists dir out of a full one, for offline tests (tens of KB).

    Keeps ``n_sources`` source packages with short texts and de+fr translations (all their binary
    packages, so -dev/-doc siblings stay together), plus four templated Rust crates (near-duplicate
    text from different sources) and writes a plain ``Release`` whose SHA256 table matches.
    """
    lists_dir, out_dir = Path(lists_dir), Path(out_dir)
    release, packages_path, trans_paths = _list_files(lists_dir, "bookworm")
    info, _ = _release_info(release)
    pk = [st for st in iter_stanzas(read_list_bytes(packages_path).decode("utf-8")) if "Description-md5" in st]
    tr = {lang: [st for st in iter_stanzas(read_list_bytes(trans_paths[lang]).decode("utf-8")) if "Description-md5" in st]
          for lang in langs}
    by_lang_md5 = {lang: {st["Description-md5"] for st in sts} for lang, sts in tr.items()}
    en_len = {st["Description-md5"]: len(st.get("Description-en", "")) for st in tr["en"]}
    by_src: dict[str, list[dict]] = defaultdict(list)
    for st in pk:
        by_src[st.get("Source", st["Package"]).split(" ")[0]].append(st)
    good = [s for s, sts in by_src.items()
            if all(120 < en_len.get(st.get("Description-md5"), 0) < 600 for st in sts) and len(sts) <= 3
            and any(st.get("Description-md5") in by_lang_md5["de"] and st.get("Description-md5") in by_lang_md5["fr"]
                    for st in sts)]
    rust = sorted(s for s, sts in by_src.items() if s.startswith("rust-") and len(sts) == 1
                  and 120 < en_len.get(sts[0].get("Description-md5"), 0) < 600)
    keep = sorted(good, key=lambda s: _rank(seed, s))[:n_sources] + sorted(rust, key=lambda s: _rank(seed, s))[:4]
    stanzas = sorted((st for s in keep for st in by_src[s]), key=lambda st: st["Package"])
    md5s = {st["Description-md5"] for st in stanzas}
    texts = {"main/binary-amd64/Packages": "\n".join(
        _stanza_text(st, ("Package", "Source", "Description", "Description-md5")) for st in stanzas)}
    for lang in langs:
        rows = sorted((st for st in tr[lang] if st["Description-md5"] in md5s), key=lambda st: st["Package"])
        texts[f"main/i18n/Translation-{lang}"] = "\n".join(
            _stanza_text(st, ("Package", "Description-md5", f"Description-{lang}")) for st in rows)
    prefix = "fixture_debian_dists_bookworm_"
    files = []
    sha_lines = []
    for rel, text in texts.items():
        data = text.encode("utf-8")
        sha_lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {rel}")
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
            f.write(data)
        path = out_dir / (prefix + rel.replace("/", "_") + ".gz")
        atomic_write_bytes(path, buf.getvalue())
        files.append(path)
    head = "".join(f"{k}: {info[k]}\n" for k in ("Origin", "Suite", "Codename", "Version", "Date") if k in info)
    rel_path = out_dir / (prefix + "Release")
    atomic_write_bytes(rel_path, (head + "SHA256:\n" + "\n".join(sha_lines) + "\n").encode())
    return [rel_path, *files]
