"""Shared libraries, resolved from what the shipped files need (``DT_NEEDED``).

A library is looked up first among the files already in the destination tree (wheels
bundle their own under ``*.libs/``), then in the standard library directories of the
unpacked packages; it is copied with its symlink chain, and its own needs are followed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from basalt.machinery.elf import ElfInfo, is_elf, read_elf

from .packages import copy_file

LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib64", "usr/lib")


@dataclass
class Resolution:
    """What :func:`resolve` copied and what it could not find, per needing file."""

    copied: list[str] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)


def elf_files(tree: Path) -> list[Path]:
    """Every regular ELF file below ``tree``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not path.is_symlink() and is_elf(path):
                found.append(path)
    return found


def _bundled(dest: Path) -> dict[str, Path]:
    return {path.name: path for path in elf_files(dest) if ".libs" in path.parent.name}


def _canonical_parent(tree: Path, relative: Path) -> Path:
    """``relative`` with its directory's (relative) symlinks resolved inside ``tree``."""
    parent = Path(os.path.realpath(tree / relative.parent)).relative_to(os.path.realpath(tree))
    return parent / relative.name


def resolve_in(tree: Path, relative: Path) -> Path:
    """The regular file that ``relative`` names inside ``tree``, as if ``tree`` were /."""
    return _chain(tree, relative)[-1]


def _chain(source_tree: Path, relative: Path) -> list[Path]:
    """``relative`` and every symlink hop after it, ending with the regular file (each
    with its directories' symlinks resolved inside ``source_tree``)."""
    relative = _canonical_parent(source_tree, relative)
    chain = [relative]
    for _ in range(16):
        source = source_tree / relative
        if not source.is_symlink():
            return chain
        target = Path(os.readlink(source))
        joined = target if target.is_absolute() else Path("/", relative.parent, target)
        relative = _canonical_parent(source_tree, Path(os.path.normpath(joined)).relative_to("/"))
        chain.append(relative)
    raise OSError(f"symlink loop at {chain[0]}")


def find(source_tree: Path, soname: str) -> Path | None:
    """``soname`` under one of :data:`LIBRARY_DIRS` of ``source_tree`` (relative)."""
    for directory in LIBRARY_DIRS:
        candidate = source_tree / directory / soname
        if candidate.exists():
            return candidate.relative_to(source_tree)
    return None


def closure(files: Iterable[Path], source_tree: Path, dest: Path) -> Resolution:
    """The libraries (and dynamic loaders, with their symlinks) that ``files`` (in
    ``dest``) need, as paths relative to ``source_tree``; nothing is copied."""
    result = Resolution()
    bundled = _bundled(dest)
    seen: set[Path] = set()
    todo: list[tuple[Path, str]] = [(path, str(path.relative_to(dest))) for path in files]
    while todo:
        path, label = todo.pop()
        info: ElfInfo = read_elf(path)
        wanted: list[Path | None] = []
        if info.interpreter and not info.soname:
            wanted.append(Path(info.interpreter).relative_to("/"))
        for soname in info.needed:
            if soname in bundled:
                continue
            relative = find(source_tree, soname)
            if relative is None:
                result.missing.setdefault(label, []).append(soname)
            wanted.append(relative)
        for relative in wanted:
            if relative is None or relative in seen:
                continue
            chain = _chain(source_tree, relative)
            seen.update(chain)
            todo.append((source_tree / chain[-1], str(chain[-1])))
    result.copied = sorted(str(path) for path in seen)
    return result


def install(resolution: Resolution, source_tree: Path, dest: Path) -> None:
    """Copy what :func:`closure` found into ``dest``."""
    for relative in resolution.copied:
        if not (dest / relative).exists() and not (dest / relative).is_symlink():
            copy_file(source_tree / relative, dest / relative)
