"""HTTP range requests and entity tags for the factory's artefacts (RFC 9110), pure.

An artefact's entity tag is its sha256 in quotes: strong, the same on every factory
that built the same bytes, and what a client checks its download against. One range
per request is served (``bytes=0-99``, ``bytes=100-``, ``bytes=-100``); a header the
server does not understand, or that asks for several ranges, is ignored and the whole
file is sent, as RFC 9110 allows. A range that starts past the end is unsatisfiable
(416 with ``Content-Range: bytes */SIZE``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


@dataclass(frozen=True)
class ByteRange:
    """The bytes ``first`` to ``last`` of a file, both included."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.first}-{self.last}/{size}"


class Unsatisfiable(ValueError):
    """A well-formed range none of whose bytes exist in the file (answer 416)."""

    def __init__(self, header: str, size: int) -> None:
        super().__init__(f"range {header.strip()!r} is outside the file's {size} bytes")
        self.size = size

    @property
    def content_range(self) -> str:
        return f"bytes */{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one range of ``header`` within a file of ``size`` bytes.

    None: send the whole file (no header, a unit other than bytes, a malformed or a
    multi-range header). Raises :class:`Unsatisfiable` for a range past the end.
    """
    if header is None:
        return None
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in specs:
        return None
    match = _SPEC.match(specs)
    if match is None or (not match[1] and not match[2]):
        return None
    if not match[1]:  # a suffix: the last N bytes
        suffix = int(match[2])
        if suffix == 0 or size == 0:
            raise Unsatisfiable(header, size)
        return ByteRange(max(size - suffix, 0), size - 1)
    first = int(match[1])
    if match[2] and int(match[2]) < first:
        return None  # invalid: ignored, like any header we do not understand
    if first >= size:
        raise Unsatisfiable(header, size)
    last = int(match[2]) if match[2] else size - 1
    return ByteRange(first, min(last, size - 1))


def etag(sha256: str) -> str:
    """The strong entity tag of a file with this sha256: ``"<hex>"``."""
    return f'"{sha256}"'


def _tags(header: str) -> list[str]:
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def none_match(header: str | None, tag: str) -> bool:
    """Whether ``If-None-Match: header`` matches ``tag`` (answer 304): ``*`` or any tag
    equal by the weak comparison (a ``W/`` prefix is ignored)."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    return any(candidate.removeprefix("W/") == tag for candidate in _tags(header))


def range_applies(if_range: str | None, tag: str) -> bool:
    """Whether a Range is honoured under ``If-Range: if_range``: only when it is absent
    or the same strong tag (a date or a weak tag: send the whole file)."""
    return if_range is None or if_range.strip() == tag


__all__ = ["ByteRange", "Unsatisfiable", "etag", "none_match", "parse_range", "range_applies"]
