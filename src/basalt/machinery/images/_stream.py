"""Streaming helpers: hash and copy in 1 MiB chunks through one reused buffer."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from typing import Protocol

CHUNK = 1 << 20

#: Open without following a symlink, and without blocking on a FIFO planted in its place.
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Reader(Protocol):
    def readinto(self, buffer: bytearray | memoryview, /) -> int | None: ...


class Writer(Protocol):
    def write(self, data: bytes | memoryview, /) -> int | None: ...


def digest(reader: Reader, limit: int, sink: Writer | None = None) -> tuple[int, str]:
    """Read at most ``limit + 1`` bytes; return how many were read and their sha256.

    Reading one byte past ``limit`` tells a file that is longer than expected without
    reading all of it. ``sink`` receives every byte read (to copy while hashing).
    """
    sha = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    while total <= limit:
        count = reader.readinto(view[: min(CHUNK, limit + 1 - total)])
        if not count:
            break
        sha.update(view[:count])
        if sink is not None:
            sink.write(view[:count])
        total += count
    return total, sha.hexdigest()


class NotRegularFileError(OSError):
    """The path is a symlink, directory, device or FIFO: never read as bundle content."""


def open_regular(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """Open a regular file without following symlinks; raise FileNotFoundError or
    NotRegularFileError. The caller closes the descriptor."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFileError(f"{os.fspath(path)} is a symbolic link") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotRegularFileError(f"{os.fspath(path)} is not a regular file")
    return fd, info


def read_small(path: str | os.PathLike[str], limit: int) -> bytes | None:
    """The whole of a small regular file; None when it does not exist.

    Raises NotRegularFileError, or ValueError when the file is larger than ``limit``.
    """
    try:
        fd, info = open_regular(path)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > limit:
            raise ValueError(f"is {info.st_size} bytes, more than the {limit} allowed")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"is more than the {limit} bytes allowed")
    return data


def fsync_directory(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class FileSeal:
    """The identity of a file whose bytes were hashed: which inode, how long, when last
    written. A verified bundle's seal lets a slot writer copy the file without hashing it
    a second time: it refuses a file that was replaced, resized or written to since.

    A tripwire against accidents, not a lock: timestamps move in the kernel's clock ticks,
    so a write in the same tick as the last hashed one keeps them. The file is machined's
    own (a private directory on EPHEMERAL); a process that could write it could as well
    write the slot partitions.
    """

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, fd: int) -> FileSeal:
        info = os.fstat(fd)
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def broken(self, fd: int) -> str | None:
        """What changed since the seal was taken (``fd`` is the file opened again), or None."""
        now = FileSeal.of(fd)
        if (now.device, now.inode) != (self.device, self.inode):
            return "it was replaced by another file"
        if now.size != self.size:
            return f"its size changed from {self.size} to {now.size} bytes"
        if (now.mtime_ns, now.ctime_ns) != (self.mtime_ns, self.ctime_ns):
            return "it was written to"
        return None
