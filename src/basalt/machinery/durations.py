"""Durations as people write them: ``90s``, ``5m``, ``1h30m``, ``7d``. One parser for the
CLI and the config documents."""

from __future__ import annotations

import re

_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float | None:
    """Seconds, or None when ``text`` is not a duration (the caller names where it was)."""
    text = text.strip()
    if not _DURATION.fullmatch(text):
        return None
    return sum(float(n) * UNITS[u] for n, u in _PART.findall(text))


def format_duration(seconds: float) -> str:
    """``5400`` -> ``1h30m``; the shortest of the forms :func:`parse_duration` reads."""
    whole = int(seconds)
    if whole != seconds or whole == 0:
        return f"{seconds:g}s"
    parts = []
    for unit in ("d", "h", "m", "s"):
        count, whole = divmod(whole, UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
