"""Real text on any Debian machine, offline: the package descriptions in /var/lib/dpkg/status.

``read_descriptions`` keeps each description's source package (the ``Source:`` field, else the
package name), which ``data/textsets.py`` needs to keep sibling packages in one set. A gzipped
status-format file works too: ``tests/fixtures/dpkg-status.gz`` is one (real Debian descriptions,
so the tests need no dpkg).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

from moe2edge._io import atomic_write_bytes
from moe2edge.data.debian import _rank, iter_stanzas, split_description
from moe2edge.data.textsets import DEFAULT_SHARES, Description, split_descriptions

DPKG_STATUS = "/var/lib/dpkg/status"


def read_descriptions(status_file: str | Path = DPKG_STATUS) -> list[Description]:
    """Descriptions with a long text of > 40 characters, one per unique long text, sorted (deterministic)."""
    path = Path(status_file)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no dpkg status file (not a Debian system?)")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    out, seen = [], set()
    for para in iter_stanzas(raw.decode("utf-8", errors="replace")):
        short, long = split_description(para.get("Description", ""))
        if short and len(long) > 40 and long not in seen:
            seen.add(long)
            pkg = para.get("Package", "")
            out.append(Description(short, long, (para.get("Source") or pkg).split(" ")[0], pkg))
    out.sort(key=lambda d: (d.short, d.long))
    return out


def installed_descriptions(status_file: str | Path = DPKG_STATUS, limit: int | None = 400) -> list[tuple[str, str]]:
    """(short, long) descriptions of the installed packages, unique long texts, sorted (deterministic)."""
    pairs = [(d.short, d.long) for d in read_descriptions(status_file)]
    return pairs if limit is None else pairs[:limit]


def installed_text_sets(status_file: str | Path = DPKG_STATUS, *, shares: dict[str, float] | None = None,
                        seed: int = 13) -> tuple[dict[str, list[Description]], dict]:
    """This machine's descriptions split into disjoint verify / calibration / probe sets by source package
    and near-duplicate group (``data/textsets.split_descriptions``); -> (sets, report)."""
    sets, report = split_descriptions(read_descriptions(status_file), shares=shares or DEFAULT_SHARES, seed=seed)
    report["source"] = str(status_file)
    return sets, report


def compile_text_sets(status_file: str | Path = DPKG_STATUS, *, verify_pairs: int | None = None
                      ) -> tuple[list[tuple[str, str]], list[str], tuple[list[str], list[str]], dict]:
    """The texts a compile checks against, from ``installed_text_sets``: (verification (short, long) pairs,
    calibration texts, the INT8 fallback's probe as two group-disjoint halves, split report)."""
    sets, report = installed_text_sets(status_file)
    halves, hrep = split_descriptions(sets["probe"], shares={"a": 1, "b": 1})
    report["probe_halves"] = hrep["sizes"]
    verify = [(d.short, d.long) for d in sets["verify"]][:verify_pairs]
    calib = [t for d in sets["calibration"] for t in (d.short, d.long)]
    probe = tuple([t for d in halves[h] for t in (d.short, d.long)] for h in ("a", "b"))
    return verify, calib, probe, report


def make_status_fixture(out: str | Path, status_file: str | Path = DPKG_STATUS, *, max_descriptions: int = 360,
                        seed: int = 13) -> Path:
    """Cut a small gzipped status-format file (Package, Source, Description) out of a real one, whole
    source packages at a time, for offline tests (``tests/fixtures/dpkg-status.gz``: tens of KB)."""
    raw = Path(status_file).read_bytes()
    by_src: dict[str, list[str]] = {}
    for st in iter_stanzas(raw.decode("utf-8", errors="replace")):
        short, long = split_description(st.get("Description", ""))
        if short and len(long) > 40:
            src = (st.get("Source") or st.get("Package", "")).split(" ")[0]
            by_src.setdefault(src, []).append(
                "".join(f"{k}: {st[k]}\n" for k in ("Package", "Source", "Description") if k in st))
    keep: list[str] = []
    for src in sorted(by_src, key=lambda s: _rank(seed, s)):
        if len(keep) + len(by_src[src]) > max_descriptions:
            continue
        keep.extend(by_src[src])
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write("\n".join(sorted(keep)).encode("utf-8"))
    atomic_write_bytes(Path(out), buf.getvalue())
    return Path(out)
