"""Durable file writes: temp file + fsync + rename + fsync of the directory."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` durable (a rename or unlink in it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path, *, mode: int | None = 0o644) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file beside it (``.NAME.XXXXXXXX``): fsynced and
    renamed over ``path`` only when the block ends without an exception, then the
    directory fsynced; otherwise the temporary file is removed and ``path`` is untouched.

    ``mode`` None leaves the file's mode as the filesystem makes it: vfat (the ESP) has no
    modes, and refuses a chmod it cannot represent.
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_exclusive(directory, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def _create_exclusive(directory: Path, prefix: str) -> tuple[int, str]:
    """A new file ``prefix`` + 12 random hex digits in ``directory``, mode 0600, opened
    for writing (what ``tempfile.mkstemp`` does; not imported: it brings ``shutil``,
    ``random`` and the compression modules, which a node's start-up does not need)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    for _ in range(100):
        name = os.path.join(directory, prefix + os.urandom(6).hex())
        try:
            return os.open(name, flags, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(directory))


def write_atomic(path: Path, data: str | bytes, *, mode: int | None = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, whole.
    ``mode`` None: no chmod (see :func:`replacing`)."""
    raw = data.encode() if isinstance(data, str) else data
    with replacing(path, mode=mode) as handle:
        handle.write(raw)


def copy_range(source: int, offset: int, size: int, out: int) -> None:
    """Copy ``size`` bytes at ``offset`` of file descriptor ``source`` to ``out`` (at its
    position) in the kernel (sendfile); EOFError when ``source`` ends first."""
    end = offset + size
    while offset < end:
        try:
            sent = os.sendfile(out, source, offset, min(end - offset, 1 << 30))
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            sent = _copy_through_memory(source, offset, min(end - offset, _CHUNK), out)
        if sent == 0:
            raise EOFError(f"the file ends {end - offset} bytes early")
        offset += sent


def _copy_through_memory(source: int, offset: int, size: int, out: int) -> int:
    """One chunk with pread/write, for files sendfile cannot copy between."""
    data = os.pread(source, size, offset)
    view = memoryview(data)
    while view:
        view = view[os.write(out, view) :]
    return len(data)


def sha256_file(path: Path) -> str:
    """The sha256 (hex) of the file at ``path``, read 1 MiB at a time."""
    import hashlib  # when first needed: it loads libcrypto

    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
