"""The C library, loaded once through ctypes, and errno-checked calls into it."""

from __future__ import annotations

import ctypes
import os
from functools import cache

__all__ = ["check", "libc"]


@cache
def libc() -> ctypes.CDLL:
    """glibc (or whatever C library the interpreter runs on), with errno kept per call."""
    return ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> int:
    """Raise :class:`OSError` (with errno and ``what`` as the file name) when ``result`` < 0."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return result
