"""Real text on any Debian machine, offline: the package descriptions in /var/lib/dpkg/status."""

from __future__ import annotations

from pathlib import Path

from moe2edge.data.debian import iter_stanzas, split_description

DPKG_STATUS = "/var/lib/dpkg/status"


def installed_descriptions(status_file: str | Path = DPKG_STATUS, limit: int | None = 400) -> list[tuple[str, str]]:
    """(short, long) descriptions of the installed packages, unique long texts, sorted (deterministic)."""
    path = Path(status_file)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no dpkg status file (not a Debian system?)")
    pairs, seen = [], set()
    for para in iter_stanzas(path.read_text(encoding="utf-8", errors="replace")):
        short, long = split_description(para.get("Description", ""))
        if short and len(long) > 40 and long not in seen:
            seen.add(long)
            pairs.append((short, long))
    pairs.sort()
    return pairs if limit is None else pairs[:limit]
