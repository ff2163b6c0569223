"""Reading a helper process's answer: everything up to the end of a pipe, bounded in time.

PID 1 forks helpers before its imports (the maintenance certificate, the kernel
modules): each writes one answer to a pipe and exits, and PID 1 reads it when it needs it.
"""

from __future__ import annotations

import os
import select
import time


def read_all(fd: int, timeout: float) -> bytes:
    """Everything readable from ``fd`` until its end; OSError when that takes longer
    than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise OSError(f"no answer within {timeout:g} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd`` (a pipe may take it in parts)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
