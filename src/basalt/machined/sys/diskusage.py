"""Disk usage of a tree, like ``du --apparent-size`` (``basaltctl usage``).

Read-only: only ``lstat`` and ``scandir``. Sizes are apparent sizes (``st_size``) of
everything that is not a directory (files, symlinks themselves, devices count 0 bytes
beyond theirs); a directory's size is the sum of what lies beneath it. Symlinks are
never followed, a file with several hard links is counted once (the first time it is
met), and the walk stays out of pseudo filesystems (proc, sysfs and the like: see
:data:`PSEUDO_FILESYSTEMS`) so that asking for ``/`` does not read the kernel's tables.

Entries come out as the walk finishes them (children before their directory), so a
caller can stream them; an entry that cannot be read carries an error and the walk
goes on.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["PSEUDO_FILESYSTEMS", "Usage", "pseudo_devices", "usage"]

#: Filesystem types whose contents are the kernel's, not data on a disk.
PSEUDO_FILESYSTEMS = frozenset(
    {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "bpf",
     "configfs", "pstore", "efivarfs", "fusectl", "binfmt_misc", "devpts", "mqueue"}
)  # fmt: skip


@dataclass(frozen=True)
class Usage:
    """One entry: its path relative to the one asked for (``.`` for itself), its size,
    whether it is a directory, and why it could not be (fully) read."""

    relative: str
    size: int
    is_dir: bool
    error: str = ""


def pseudo_devices(mountinfo: str) -> frozenset[int]:
    """The device numbers of pseudo filesystems in ``/proc/self/mountinfo``'s text."""
    found = set()
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 3 or not rest or rest[0] not in PSEUDO_FILESYSTEMS:
            continue
        major, _, minor = fields[2].partition(":")
        if major.isdigit() and minor.isdigit():
            found.add(os.makedev(int(major), int(minor)))
    return frozenset(found)


@dataclass
class _Dir:
    path: str
    relative: str
    depth: int
    children: list[str]
    size: int = 0
    error: str = ""


def usage(
    top: str,
    *,
    max_depth: int,
    show_files: bool,
    skip: Callable[[str], bool] = lambda _path: False,
    pseudo: frozenset[int] = frozenset(),
) -> Iterator[Usage]:
    """Entries of the tree at host path ``top`` down to ``max_depth`` levels below it
    (-1: no limit), directories only unless ``show_files``; ``top`` itself always comes,
    last. ``skip(path)``: a directory whose contents must not be read (sensitive ones);
    ``pseudo``: device numbers not to enter (see :func:`pseudo_devices`).
    """
    seen: set[tuple[int, int]] = set()
    try:
        st = os.lstat(top)
    except OSError as exc:
        yield Usage(".", 0, False, _reason(exc))
        return
    if not stat.S_ISDIR(st.st_mode):
        yield Usage(".", st.st_size, False)
        return
    stack = [_open_dir(top, ".", 0, st.st_dev, skip, pseudo)]
    while stack:
        current = stack[-1]
        if not current.children:
            stack.pop()
            if stack:
                stack[-1].size += current.size
            if max_depth < 0 or current.depth <= max_depth:
                yield Usage(current.relative, current.size, True, current.error)
            continue
        name = current.children.pop()
        path = os.path.join(current.path, name)
        relative = name if current.relative == "." else f"{current.relative}/{name}"
        try:
            st = os.lstat(path)
        except OSError as exc:
            if _shown(current.depth + 1, max_depth, show_files):
                yield Usage(relative, 0, False, _reason(exc))
            continue
        if stat.S_ISDIR(st.st_mode):
            stack.append(_open_dir(path, relative, current.depth + 1, st.st_dev, skip, pseudo))
            continue
        if st.st_nlink > 1:
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
        current.size += st.st_size
        if _shown(current.depth + 1, max_depth, show_files):
            yield Usage(relative, st.st_size, False)


def _shown(depth: int, max_depth: int, show_files: bool) -> bool:
    return show_files and (max_depth < 0 or depth <= max_depth)


def _open_dir(
    path: str,
    relative: str,
    depth: int,
    device: int,
    skip: Callable[[str], bool],
    pseudo: frozenset[int],
) -> _Dir:
    if device in pseudo:
        return _Dir(path, relative, depth, [], error="not counted: a kernel pseudo filesystem")
    if skip(path):
        return _Dir(path, relative, depth, [], error="not counted: sensitive path")
    try:
        with os.scandir(path) as entries:
            names = sorted((entry.name for entry in entries), reverse=True)
    except OSError as exc:
        return _Dir(path, relative, depth, [], error=f"cannot list directory: {_reason(exc)}")
    return _Dir(path, relative, depth, names)


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()
