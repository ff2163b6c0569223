"""Ordering Basalt versions, to refuse a downgrade unless an admin asks for one.

A version (``manifest.VERSION_RE``) is a release, optionally followed by ``-`` or ``~`` and
a pre-release: ``0.9.1``, ``1.0.0-rc.2``, ``1.0.0~beta``. Releases compare dot-separated
part by part, numbers as numbers (``0.10.0`` > ``0.9.1``) and below words, a missing part
as lowest (``1.0`` < ``1.0.0``); a pre-release sorts before its release
(``1.0.0-rc.2`` < ``1.0.0``), and pre-releases compare like releases. Pure.
"""

from __future__ import annotations

import re

_SPLIT = re.compile(r"[-~]")

Key = tuple[tuple[tuple[int, int, str], ...], int, tuple[tuple[int, int, str], ...]]


def _parts(text: str) -> tuple[tuple[int, int, str], ...]:
    parts = []
    for part in text.split("."):
        for token in re.findall(r"[0-9]+|[^0-9]+", part) or [""]:
            parts.append((0, int(token), "") if token.isdigit() else (1, 0, token))
    return tuple(parts)


def version_key(version: str) -> Key:
    """A sort key: ``version_key(a) < version_key(b)`` when ``a`` is older than ``b``."""
    found = _SPLIT.search(version)
    release = version[: found.start()] if found else version
    pre = version[found.end() :] if found else ""
    # A release without a pre-release sorts after every pre-release of it.
    return (_parts(release), 0 if found else 1, _parts(pre))


def is_downgrade(current: str, new: str) -> bool:
    """Whether installing ``new`` over ``current`` goes back to an older version."""
    return version_key(new) < version_key(current)
