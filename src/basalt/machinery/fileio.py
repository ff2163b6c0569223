"""Durable file writes: temp file + fsync + rename + fsync of the directory."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
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


def write_atomic(path: Path, data: str | bytes, *, mode: int | None = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, whole.
    ``mode`` None: no chmod (see :func:`replacing`)."""
    raw = data.encode() if isinstance(data, str) else data
    with replacing(path, mode=mode) as handle:
        handle.write(raw)
