"""The system clock: read it, step it (``clock_settime``) or slew it (``adjtime``).

Only PID 1 of a Basalt machine corrects the clock (the clock is machine-wide; a test or
a developer's shell must never move the host's). Everything else gets an
:class:`ObservingClock`, which measures and reports but changes nothing.
"""

from __future__ import annotations

import ctypes
import time
from typing import Protocol

from ._libc import check, libc

__all__ = ["STEP_THRESHOLD", "Clock", "ObservingClock", "SystemClock"]

#: Offsets at least this large are stepped; smaller ones are slewed (as ntpd does).
STEP_THRESHOLD = 0.128
_CLOCK_REALTIME = 0


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class Clock(Protocol):
    #: Whether :meth:`correct` changes the machine's clock.
    sets: bool

    def now(self) -> float: ...

    def correct(self, offset: float) -> str:
        """Move the clock by ``offset`` seconds; returns how: "step", "slew" or "none"."""
        ...


class ObservingClock:
    """Reads the clock, never moves it."""

    sets = False

    def now(self) -> float:
        return time.time()

    def correct(self, offset: float) -> str:
        return "none"


class SystemClock:
    """The machine's CLOCK_REALTIME; needs CAP_SYS_TIME."""

    sets = True

    def now(self) -> float:
        return time.time()

    def correct(self, offset: float) -> str:
        if abs(offset) >= STEP_THRESHOLD:
            target = time.time() + offset
            seconds = int(target // 1)
            spec = _Timespec(seconds, int((target - seconds) * 1e9))
            check(libc().clock_settime(_CLOCK_REALTIME, ctypes.byref(spec)), "clock_settime")
            return "step"
        whole = int(offset // 1)
        delta = _Timeval(whole, int((offset - whole) * 1e6))
        check(libc().adjtime(ctypes.byref(delta), None), "adjtime")
        return "slew"
