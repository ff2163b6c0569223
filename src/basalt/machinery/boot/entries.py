"""systemd-boot's view of boot entries, as pure functions over file names.

This is what the firmware side does on metal, written down so that the assessment
logic, the container launcher and the tests all follow it exactly:

- an entry ``NAME+LEFT[-DONE].conf`` has boot counting; without ``+`` it is blessed;
- entries sort by: no tries left last, then entry id (the lowercased file name) in
  reverse ``strverscmp_improved`` order, then more tries left, then fewer done;
- with no ``default`` line and no EFI overrides, the first entry boots;
- booting a counted entry renames it to ``+max(LEFT-1,0)-(DONE+1)``;
- marking it good renames it without the counter.

Ported from systemd's ``src/boot/efi/boot.c`` (``config_entry_parse_tries``,
``config_entry_compare``) and ``src/fundamental/string-util-fundamental.c``
(``strverscmp_improved``). Entries with a ``sort-key`` line are not modelled: Basalt
never writes one.

Basalt names its own entries ``basalt-GEN-SLOT-VERSION[+LEFT[-DONE]].conf``. GEN, the
install generation, grows with every install and rollback, so the entry installed
last sorts first whatever its version (downgrades work), and the two slots can
never collide on a name, even when they hold the same version.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cmp_to_key
from typing import Any

from basalt.machinery.errors import BasaltError

SUFFIX = ".conf"
PREFIX = "basalt-"
INT_MAX = 2**31 - 1


class BootEntryError(BasaltError):
    """A boot entry name or stored boot state is not one Basalt wrote."""


# -- strverscmp_improved --------------------------------------------------------------------------


def _is_alpha(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def _is_digit(c: str) -> bool:
    return "0" <= c <= "9"


def _valid(c: str) -> bool:
    return _is_digit(c) or _is_alpha(c) or c in "~-^."


def _cmp(x: Any, y: Any) -> int:
    return int(x > y) - int(x < y)


def strverscmp_improved(a: str, b: str) -> int:
    """systemd's version comparison: -1, 0 or 1 (``a`` older, equal, newer)."""
    if not a or not b:
        return _cmp(a, b)
    i = j = 0
    a, b = a + "\0", b + "\0"
    while True:
        while a[i] != "\0" and not _valid(a[i]):
            i += 1
        while b[j] != "\0" and not _valid(b[j]):
            j += 1
        if a[i] == "~" or b[j] == "~":  # pre-release: older
            if r := _cmp(a[i] != "~", b[j] != "~"):
                return r
            i, j = i + 1, j + 1
        if a[i] == "\0" or b[j] == "\0":  # the longer is newer
            return _cmp(a[i], b[j])
        for mark in "-^.":
            if a[i] == mark or b[j] == mark:
                if r := _cmp(a[i] != mark, b[j] != mark):
                    return r
                i, j = i + 1, j + 1
        if _is_digit(a[i]) or _is_digit(b[j]):
            while a[i] == "0":
                i += 1
            while b[j] == "0":
                j += 1
            ii, jj = i, j
            while _is_digit(a[ii]):
                ii += 1
            while _is_digit(b[jj]):
                jj += 1
            if r := _cmp(ii - i, jj - j):
                return r
            if r := _cmp(a[i:ii], b[j:jj]):
                return r
        else:
            ii, jj = i, j
            while _is_alpha(a[ii]):
                ii += 1
            while _is_alpha(b[jj]):
                jj += 1
            n = min(ii - i, jj - j)
            if r := _cmp(a[i : i + n], b[j : j + n]):
                return r
            if r := _cmp(ii - i, jj - j):
                return r
        i, j = ii, jj


# -- any entry, as systemd-boot reads it ----------------------------------------------------------


@dataclass(frozen=True)
class LoaderEntry:
    """A type #1 entry file as systemd-boot sees it. ``tries_left`` None: no counting."""

    filename: str
    tries_left: int | None
    tries_done: int | None

    @property
    def id(self) -> str:
        return self.filename.lower()

    @classmethod
    def parse(cls, filename: str) -> LoaderEntry:
        """Read the boot counter the way ``config_entry_parse_tries`` does."""
        _, plus, counter = filename.rpartition("+")
        if not plus or not filename.endswith(SUFFIX):
            return cls(filename, None, None)
        counter = counter[: -len(SUFFIX)]
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", counter)
        if match is None:
            return cls(filename, None, None)
        left, done = int(match[1]), int(match[2] or 0)
        if left > INT_MAX or done > INT_MAX:
            return cls(filename, None, None)
        return cls(filename, left, done)

    def next_name(self) -> str:
        """The name systemd-boot renames this entry to when it boots it."""
        if self.tries_left is None or self.tries_done is None:
            return self.filename
        stem = self.filename[: self.filename.rindex("+")]
        left = max(self.tries_left - 1, 0)
        return f"{stem}+{left}-{min(self.tries_done + 1, INT_MAX)}{SUFFIX}"

    def blessed_name(self) -> str:
        """The name after marking it good: the counter dropped."""
        if self.tries_left is None:
            return self.filename
        return self.filename[: self.filename.rindex("+")] + SUFFIX


def compare_entries(a: LoaderEntry, b: LoaderEntry) -> int:
    """``config_entry_compare`` for entries without ``sort-key``: negative sorts ``a`` first."""
    if r := _cmp(a.tries_left == 0, b.tries_left == 0):
        return r
    if r := -strverscmp_improved(a.id, b.id):
        return r
    if a.tries_left is None or b.tries_left is None or b.tries_done is None:
        return 0
    if r := -_cmp(a.tries_left, b.tries_left):
        return r
    return _cmp(a.tries_done, b.tries_done)


def loader_order(filenames: Iterable[str]) -> list[str]:
    """Entry file names in systemd-boot's menu order; the first one boots by default."""
    entries = sorted(
        (LoaderEntry.parse(name) for name in filenames), key=cmp_to_key(compare_entries)
    )
    return [e.filename for e in entries]


# -- Basalt's own entries -------------------------------------------------------------------------

_BASALT_RE = re.compile(
    r"basalt-(?P<gen>[1-9][0-9]{0,8})-(?P<slot>[ab])-(?P<version>[0-9a-z][0-9a-z._~-]{0,63}?)"
    r"(?:\+(?P<left>[0-9]{1,9})(?:-(?P<done>[0-9]{1,9}))?)?\.conf"
)


@dataclass(frozen=True)
class BasaltEntry:
    """``basalt-GEN-SLOT-VERSION[+LEFT[-DONE]].conf``: one slot's boot entry."""

    generation: int
    slot: str
    version: str
    tries_left: int | None = None
    tries_done: int = 0

    @classmethod
    def parse(cls, filename: str) -> BasaltEntry:
        match = _BASALT_RE.fullmatch(filename)
        if match is None:
            raise BootEntryError(
                f"boot entry {filename!r} is not one Basalt writes "
                "(basalt-GEN-SLOT-VERSION[+LEFT[-DONE]].conf)",
                hint="remove it from loader/entries on the ESP; Basalt manages that directory",
            )
        left = match["left"]
        return cls(
            int(match["gen"]),
            match["slot"],
            match["version"],
            None if left is None else int(left),
            int(match["done"] or 0),
        )

    @property
    def filename(self) -> str:
        counter = ""
        if self.tries_left is not None:
            counter = f"+{self.tries_left}" + (f"-{self.tries_done}" if self.tries_done else "")
        return f"{PREFIX}{self.generation}-{self.slot}-{self.version}{counter}{SUFFIX}"
