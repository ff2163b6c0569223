"""A reproducible ``newc`` cpio writer for initramfs archives.

Written here rather than driving GNU cpio so the archive is a pure function of the
tree: entries sorted, owner root, one fixed mtime, inode numbers by position, and
device nodes (``/dev/console``) added without needing root on the build host.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .stage import walk_sorted

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Node:
    """A device node to add: ``path`` inside the archive, ``char`` or block, numbers."""

    path: str
    mode: int
    major: int
    minor: int
    char: bool = True


def _pad(stream: BinaryIO, length: int) -> None:
    stream.write(b"\0" * (-length % 4))


def _entry(
    stream: BinaryIO,
    name: str,
    ino: int,
    mode: int,
    data: bytes,
    mtime: int,
    rdev: tuple[int, int] = (0, 0),
    nlink: int = 1,
) -> None:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    stream.write(header + encoded)
    _pad(stream, len(header) + len(encoded))
    stream.write(data)
    _pad(stream, len(data))


def write(tree: Path, stream: BinaryIO, mtime: int, nodes: tuple[Node, ...] = ()) -> int:
    """Write ``tree`` (and ``nodes``) as a newc archive; return the number of entries."""
    ino = 0
    for path in walk_sorted(tree):
        ino += 1
        name = str(path.relative_to(tree))
        info = path.lstat()
        perm = stat.S_IMODE(info.st_mode)
        if path.is_symlink():
            _entry(stream, name, ino, stat.S_IFLNK | 0o777, os.readlink(path).encode(), mtime)
        elif path.is_dir():
            _entry(stream, name, ino, stat.S_IFDIR | perm, b"", mtime, nlink=2)
        else:
            _entry(stream, name, ino, stat.S_IFREG | perm, path.read_bytes(), mtime)
    for node in nodes:
        ino += 1
        kind = stat.S_IFCHR if node.char else stat.S_IFBLK
        _entry(stream, node.path, ino, kind | node.mode, b"", mtime, rdev=(node.major, node.minor))
    _entry(stream, TRAILER, 0, 0, b"", 0, nlink=1)
    return ino
