"""Real text for tests from a committed file, not this machine's /var/lib/dpkg/status (which a machine
without dpkg lacks, and whose content changes with what is installed)."""

from __future__ import annotations

from pathlib import Path

from moe2edge.data.installed import installed_descriptions

FIXTURE_STATUS = Path(__file__).resolve().parent / "fixtures" / "dpkg-status.gz"  # 353 real descriptions


def fixture_descriptions(limit: int | None = 400) -> list[tuple[str, str]]:
    """(short, long) Debian descriptions of the fixture, sorted (deterministic), at most ``limit``."""
    return installed_descriptions(FIXTURE_STATUS, limit=limit)
