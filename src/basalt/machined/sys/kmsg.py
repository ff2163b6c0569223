"""The kernel log, read from ``/dev/kmsg`` without blocking the event loop."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator

from basalt.machinery.errors import UnavailableError

__all__ = ["KMSG", "format_record", "read_kmsg"]

KMSG = "/dev/kmsg"

#: One read returns one record; the kernel refuses buffers smaller than the record.
_RECORD_MAX = 16 * 1024

_HINT = (
    "the agent needs read access to /dev/kmsg (root with CAP_SYSLOG, on a metal node); "
    "on a container-mode node read the host's log with `dmesg` on the host"
)


async def read_kmsg(follow: bool, tail: bool) -> AsyncIterator[bytes]:
    """Kernel log lines, ``[   12.345678] message``, without a trailing newline.

    Without ``follow`` the iteration ends at the last record there is now; with it, it
    waits for new ones (until the consumer stops). With ``tail`` the records already
    in the buffer are skipped. Records the kernel overwrote before they were read are
    skipped too. Raises :class:`UnavailableError` before yielding anything when the log
    cannot be read here.
    """
    fd = _open(tail)
    loop = asyncio.get_running_loop()
    first = True
    try:
        while True:
            try:
                record = os.read(fd, _RECORD_MAX)
            except BlockingIOError:
                if not follow:
                    return
                await _readable(loop, fd)
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EINTR):  # EPIPE: overwritten records
                    continue
                if first:
                    raise _unavailable(exc) from None
                raise
            first = False
            line = format_record(record)
            if line is not None:
                yield line
    finally:
        os.close(fd)


def format_record(record: bytes) -> bytes | None:
    """``b"6,42,12345678,-;text\\n KEY=v\\n"`` -> ``b"[   12.345678] text"``; None if malformed."""
    header, sep, rest = record.partition(b";")
    fields = header.split(b",")
    if not sep or len(fields) < 3:
        return None
    try:
        usec = int(fields[2])
    except ValueError:
        return None
    message = rest.split(b"\n", 1)[0]  # continuation lines (" KEY=value") are metadata
    seconds, micros = divmod(usec, 1_000_000)
    return f"[{seconds:5d}.{micros:06d}] ".encode() + message


def _open(tail: bool) -> int:
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _unavailable(exc) from None
    if tail:
        try:
            os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(fd)
            raise _unavailable(exc) from None
    return fd


def _unavailable(exc: OSError) -> UnavailableError:
    reason = (exc.strerror or str(exc)).lower()
    return UnavailableError(f"kernel log is not readable here: {reason}", hint=_HINT)


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until ``fd`` has data, with the loop's reader callback (no polling)."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
