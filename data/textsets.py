"""Disjoint text sets: calibration, the INT8 fallback's probe and verification never share a group.

Neighbouring package descriptions are siblings (``libfoo1`` / ``libfoo-dev`` / ``libfoo-doc``, rust
crates, dictionaries: many near-identical), so taking every other row of a sorted list gives
calibration and verification sets that are copies of each other. The corpus builder's grouping
(``data/debian.py``) is reused: two texts are in one group when they share a source package, a
normalised text or a MinHash LSH band of word shingles; a group goes to exactly one set, and
``leakage`` recomputes every key and counts the texts of one set that share a key with another (0 is
the only accepted answer). User-given files (``--calibration FILE``, ``--verify-file``) carry no
source package: ``overlap`` counts their exact (normalised) and near-duplicate (shared band) texts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from moe2edge.data.debian import BuildConfig, Unit, _h, _rank, group_units, leakage_check, minhash_bands, normalise, \
    unit_keys

ROLES = ("verify", "calibration", "probe")
DEFAULT_SHARES = {"verify": 0.4, "calibration": 0.35, "probe": 0.25}


@dataclass(frozen=True)
class Description:
    """One package description: the short line (a query), the long text (a document), its source package."""

    short: str
    long: str
    source: str
    package: str = ""


def _units(records: list[Description]) -> list[Unit]:
    return [Unit(md5=hashlib.md5(r.long.encode("utf-8")).hexdigest(), short=r.short, long=r.long,
                 packages=[r.package or r.source], sources=[r.source]) for r in records]


def assign_groups(group_of: list[int], shares: dict[str, float], *, seed: int) -> dict[str, list[int]]:
    """Item indices per role; whole groups only. Groups are visited in a seeded-hash order and each goes
    to the role furthest below its share of the items (deterministic, sizes close to the shares)."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_of):
        members.setdefault(g, []).append(i)
    total = sum(shares.values())
    out: dict[str, list[int]] = {r: [] for r in shares}
    done = 0
    for g in sorted(members, key=lambda g: _rank(seed, f"textset:{g}:{min(members[g])}")):
        done += len(members[g])
        role = max(shares, key=lambda r: shares[r] / total * done - len(out[r]))
        out[role].extend(members[g])
    return {r: sorted(v) for r, v in out.items()}


def split_descriptions(records: list[Description], *, shares: dict[str, float] | None = None, seed: int = 13,
                       cfg: BuildConfig = BuildConfig()) -> tuple[dict[str, list[Description]], dict]:
    """-> ({role: descriptions}, report). Roles default to verify / calibration / probe; the report holds
    the sizes, group counts and the pairwise leakage check (raises ``RuntimeError`` if any set leaks)."""
    shares = shares or DEFAULT_SHARES
    units = _units(records)
    # The corpus builder's keys, plus the plain-text keys of each short and long text (what ``overlap``
    # checks at compile time: a short line can be a near-duplicate of another package's text).
    short_k, long_k = text_keys([r.short for r in records], cfg), text_keys([r.long for r in records], cfg)
    keys = [u + s + lk for u, s, lk in zip(unit_keys(units, cfg), short_k, long_k)]
    groups = group_units(units, keys)
    idx = assign_groups(groups, shares, seed=seed)
    sets = {r: [records[i] for i in v] for r, v in idx.items()}
    report = {"grouping": "source package + normalised text + MinHash LSH band (data/debian.py)",
              "seed": seed, "descriptions": len(records), "groups": len(set(groups)),
              "sizes": {r: len(v) for r, v in sets.items()},
              "groups_per_set": {r: len({groups[i] for i in v}) for r, v in idx.items()}}
    report["leakage"] = leakage(sets, cfg)
    for i, a in enumerate(list(sets)):
        for b in list(sets)[i + 1:]:
            ov = overlap([t for d in sets[a] for t in (d.short, d.long)], [t for d in sets[b] for t in (d.short, d.long)], cfg)
            report["leakage"][f"{a}->{b} text overlap"] = ov["exact"] + ov["near_duplicate"]
    leaking = {k: v for k, v in report["leakage"].items() if v}
    if leaking:
        raise RuntimeError(f"text sets leak into each other: {leaking}")
    return sets, report


def leakage(sets: dict[str, list[Description]], cfg: BuildConfig = BuildConfig()) -> dict[str, int]:
    """{"a->b": texts of b that share a source, normalised text or band with a} for every pair of sets."""
    roles = list(sets)
    out = {}
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            rep = leakage_check(_units(sets[a]), _units(sets[b]), cfg)
            out[f"{a}->{b}"] = rep["test_units_leaking"]
    return out


def text_keys(texts: list[str], cfg: BuildConfig = BuildConfig()) -> list[list[str]]:
    """Grouping keys of plain texts (no source package): normalised text + MinHash bands."""
    bands = minhash_bands(texts, cfg) if texts else []
    return [[f"text:{_h(normalise(t))}", *(f"band:{int(k):016x}" for k in b)] for t, b in zip(texts, bands)]


def overlap(reference: list[str], other: list[str], cfg: BuildConfig = BuildConfig()) -> dict[str, int]:
    """How many texts of ``other`` duplicate one of ``reference``: exactly (after ``normalise``) or nearly
    (a shared MinHash band, not exact)."""
    keys = text_keys(list(reference) + list(other), cfg)
    ref_keys = set().union(*keys[:len(reference)]) if reference else set()
    exact = near = 0
    for ks in keys[len(reference):]:
        if ks[0] in ref_keys:
            exact += 1
        elif any(k in ref_keys for k in ks[1:]):
            near += 1
    return {"texts": len(other), "exact": exact, "near_duplicate": near}


def split_texts(texts: list[str], shares: dict[str, float], *, seed: int = 13,
                cfg: BuildConfig = BuildConfig()) -> dict[str, list[str]]:
    """Plain texts into roles by near-duplicate group (for a user's calibration file: calibration + probe)."""
    keys = text_keys(texts, cfg)
    idx = assign_groups(group_units([None] * len(texts), keys), shares, seed=seed)
    return {r: [texts[i] for i in v] for r, v in idx.items()}
