"""Helper processes that answer once through a pipe, and reading that answer in time.

PID 1 forks helpers before its imports (the maintenance certificate, the kernel
modules): each writes one answer to a pipe and exits, and PID 1 reads it when it needs it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


def fork_helper(
    work: Callable[[], dict[str, object] | None], what: str, child_closes: Sequence[int] = ()
) -> tuple[int, int] | None:
    """Fork a helper process; only while no thread runs. The helper closes
    ``child_closes`` (the parent's ends of other pipes), puts stdin, stdout and stderr on
    /dev/null (its output must not mix into PID 1's, ``-X importtime`` lines included),
    runs ``work`` and writes the JSON of what it returns to the answer pipe (``{"error":
    "Type: message"}`` when it raises; nothing when it returns None), then exits.
    Returns (its pid, the answer pipe's read end), or None, logged as "no WHAT", when the
    system refuses."""
    try:
        answers, answer = os.pipe()
    except OSError as exc:
        log.warning("no %s: %s", what, exc)
        return None
    try:
        pid = os.fork()
    except OSError as exc:
        log.warning("no %s: %s", what, exc)
        os.close(answers)
        os.close(answer)
        return None
    if pid == 0:  # the helper: never returns into the parent's code
        code = 1
        try:
            for fd in (answers, *child_closes):
                os.close(fd)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            try:
                reply = work()
            except Exception as exc:  # reported to the parent, which does without
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            if reply is not None:
                write_all(answer, json.dumps(reply).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(answer)
    return pid, answers


class HelperAnswerError(Exception):
    """A helper's answer did not come in time, was not one, or reported a failure; the
    message names the helper and says which."""


def read_answer(fd: int, timeout: float, what: str) -> dict[str, Any]:
    """The answer a :func:`fork_helper` helper wrote to ``fd`` (closed afterwards), read
    within ``timeout`` seconds; HelperAnswerError when there is none or it says "error"."""
    try:
        data = read_all(fd, timeout)
    except OSError as exc:
        raise HelperAnswerError(f"the {what} did not answer: {exc}") from None
    finally:
        os.close(fd)
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise HelperAnswerError(f"the {what} gave no answer")
    if "error" in reply:
        raise HelperAnswerError(f"the {what} failed: {reply['error']}")
    return reply


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
