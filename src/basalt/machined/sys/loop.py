"""Loop devices: attach a file read-only with ``LOOP_CONFIGURE`` (Linux >= 5.8).

A free device comes from ``/dev/loop-control`` (``LOOP_CTL_GET_FREE``); the file is
attached read-only with autoclear, so the device frees itself once the filesystem on it
is unmounted and no one holds it open. That includes the opener: the device must be
mounted before :meth:`Attached.close`, or it is detached again at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from pathlib import Path

from basalt.machinery.errors import BasaltError

__all__ = ["Attached", "LoopError", "attach", "attach_read_only", "loop_config"]

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
#: struct loop_info64: five u64, four u32, file name (64), crypt name (64), key (32), two u64.
_LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
#: struct loop_config: fd, block_size, loop_info64, eight reserved u64.
_LOOP_CONFIG_HEAD = struct.Struct("=II")
_RESERVED = 8 * 8
_ATTEMPTS = 5


class LoopError(BasaltError):
    """A file could not be attached to a loop device (no loop driver, no free device)."""


def loop_config(
    fd: int,
    name: str,
    flags: int = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
    *,
    offset: int = 0,
    size_limit: int = 0,
) -> bytes:
    """The ``struct loop_config`` bytes attaching ``fd`` (its name shown in sysfs), from
    byte ``offset`` for ``size_limit`` bytes (0: to the end)."""
    info = _LOOP_INFO64.pack(
        0, 0, 0, offset, size_limit, 0, 0, 0, flags, name.encode()[:63], b"", b"", 0, 0
    )
    return _LOOP_CONFIG_HEAD.pack(fd, 0) + info + b"\0" * _RESERVED


class Attached:
    """A loop device with ``path`` attached, held open until :meth:`close`."""

    def __init__(self, device: Path, fd: int) -> None:
        self.device = device
        self._fd = fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Attached:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach_read_only(path: Path, dev: Path = Path("/dev")) -> Attached:
    """Attach ``path`` to a free loop device read-only. Mount it, then close the result
    (autoclear detaches a device nothing holds)."""
    return attach(path, dev=dev)


def attach(
    path: Path,
    *,
    read_only: bool = True,
    offset: int = 0,
    size_limit: int = 0,
    dev: Path = Path("/dev"),
) -> Attached:
    """Attach ``path`` (from byte ``offset``, ``size_limit`` bytes; 0: to its end) to a
    free loop device, with autoclear. Mount it, then close the result."""
    flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if read_only else 0)
    mode = os.O_RDONLY if read_only else os.O_RDWR
    control = dev / "loop-control"
    try:
        control_fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise LoopError(
            f"cannot open {control}: {exc.strerror}", hint="is the loop kernel module loaded?"
        ) from None
    try:
        backing = os.open(path, mode | os.O_CLOEXEC)
    except OSError as exc:
        os.close(control_fd)
        raise LoopError(f"cannot open {path}: {exc.strerror}") from None
    try:
        for _ in range(_ATTEMPTS):  # another process may take the free device first
            index = fcntl.ioctl(control_fd, LOOP_CTL_GET_FREE)
            device = dev / f"loop{index}"
            _wait_for(device)
            loop_fd = os.open(device, mode | os.O_CLOEXEC)
            config = loop_config(backing, str(path), flags, offset=offset, size_limit=size_limit)
            try:
                fcntl.ioctl(loop_fd, LOOP_CONFIGURE, config)
            except OSError as exc:
                os.close(loop_fd)
                if exc.errno != errno.EBUSY:
                    raise LoopError(f"attach {path} to {device}: {exc.strerror}") from None
                continue
            return Attached(device, loop_fd)
        raise LoopError(f"attach {path}: every free loop device was taken meanwhile")
    finally:
        os.close(backing)
        os.close(control_fd)


def _wait_for(device: Path, timeout: float = 2.0) -> None:
    """devtmpfs creates the node once the device exists; give it a moment."""
    deadline = time.monotonic() + timeout
    while not device.exists():
        if time.monotonic() > deadline:
            raise LoopError(f"{device} did not appear within {timeout:g} s")
        time.sleep(0.01)
