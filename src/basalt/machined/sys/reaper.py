"""Zombie reaping for PID 1 without stealing anyone else's exit status.

As PID 1, machined inherits every orphan on the machine (a daemon's double fork, a
shim whose parent exited): when they exit, nobody but PID 1 can reap them. But
machined also has children of its own whose exit status someone is waiting for:
asyncio subprocesses (services) and ``subprocess`` children run from worker threads.
A plain ``waitpid(-1)`` would take those statuses away (asyncio then reports 255,
``subprocess`` reports 0).

So the reaper never calls ``waitpid(-1)``. It reaps one pid at a time, and only a pid
that is

* a zombie whose parent is this process (read from /proc),
* not owned by asyncio: asyncio's child watcher is replaced by
  :class:`OwnedChildWatcher`, a :class:`asyncio.PidfdChildWatcher` that records the
  pids it waits for (both run on the event loop thread, so there is no window in
  which a pid is a zombie but not yet recorded),
* and a zombie for at least ``grace`` seconds, which leaves threads that run
  ``subprocess`` (and wait for their child at once) time to collect it first.

It runs on SIGCHLD (through the loop's signal handler) and every ``interval`` seconds,
since signals coalesce. It also works for a child subreaper (PR_SET_CHILD_SUBREAPER),
which is how tests exercise it without being PID 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVarTuple, Unpack

__all__ = ["OwnedChildWatcher", "Reaper", "parse_stat", "select_reapable"]

_Ts = TypeVarTuple("_Ts")

log = logging.getLogger(__name__)


def parse_stat(text: str) -> tuple[str, int]:
    """``/proc/PID/stat`` -> (state letter, parent pid). The command may hold ``)``."""
    fields = text.rpartition(")")[2].split()
    return fields[0], int(fields[1])


def select_reapable(
    zombies: Iterable[int],
    owned: set[int],
    first_seen: dict[int, float],
    now: float,
    grace: float,
) -> list[int]:
    """The zombies to reap now; updates ``first_seen`` (pids no longer zombies leave it)."""
    current = set(zombies)
    for pid in list(first_seen):
        if pid not in current:
            del first_seen[pid]
    chosen = []
    for pid in sorted(current):
        if pid in owned:
            first_seen.pop(pid, None)
            continue
        seen = first_seen.setdefault(pid, now)
        if now - seen >= grace:
            chosen.append(pid)
    return chosen


class OwnedChildWatcher(asyncio.PidfdChildWatcher):
    """asyncio's pidfd watcher, remembering which pids asyncio waits for."""

    def __init__(self) -> None:
        super().__init__()
        self.owned: set[int] = set()

    def add_child_handler(
        self,
        pid: int,
        callback: Callable[[int, int, Unpack[_Ts]], object],
        *args: *_Ts,
    ) -> None:
        self.owned.add(pid)

        def done(pid: int, returncode: int, *rest: *_Ts) -> None:
            self.owned.discard(pid)
            callback(pid, returncode, *rest)

        super().add_child_handler(pid, done, *args)

    def remove_child_handler(self, pid: int) -> bool:
        self.owned.discard(pid)
        return bool(super().remove_child_handler(pid))


def _children(proc: Path, own: int) -> list[int]:
    """Direct children of this process: /proc/self/task/*/children, else a full scan."""
    found: set[int] = set()
    try:
        for task in (proc / str(own) / "task").iterdir():
            found.update(int(p) for p in (task / "children").read_text().split())
        return sorted(found)
    except (OSError, ValueError):
        pass
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                _, parent = parse_stat((entry / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
            if parent == own:
                found.add(int(entry.name))
    return sorted(found)


def _zombies(proc: Path, own: int) -> list[int]:
    zombies = []
    for pid in _children(proc, own):
        try:
            state, parent = parse_stat((proc / str(pid) / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        if state == "Z" and parent == own:
            zombies.append(pid)
    return zombies


@dataclass
class Reaper:
    """Reaps orphaned zombies; see the module docstring for what it leaves alone."""

    grace: float = 1.0
    interval: float = 10.0
    proc: Path = Path("/proc")
    watcher: OwnedChildWatcher = field(default_factory=OwnedChildWatcher)
    #: (pid, wait status) of every orphan reaped, the latest last (bounded).
    reaped: list[tuple[int, int]] = field(default_factory=list)
    _first_seen: dict[int, float] = field(default_factory=dict)
    _wake: asyncio.Event | None = None
    _task: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Take over asyncio's child watching and SIGCHLD on the running loop."""
        loop = asyncio.get_running_loop()
        self.watcher.attach_loop(loop)
        asyncio.set_child_watcher(self.watcher)
        self._wake = asyncio.Event()
        loop.add_signal_handler(signal.SIGCHLD, self._wake.set)
        self._task = loop.create_task(self._run(), name="reaper")

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_signal_handler(signal.SIGCHLD)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await asyncio.sleep(0.05)  # a burst of SIGCHLDs: one scan
            while self.reap_once():
                # Zombies still in their grace period: look again once it is over.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.grace)
                self._wake.clear()

    def reap_once(self) -> bool:
        """Reap what may be reaped now; True when zombies wait out their grace period."""
        own = os.getpid()
        zombies = _zombies(self.proc, own)
        chosen = select_reapable(
            zombies, self.watcher.owned, self._first_seen, time.monotonic(), self.grace
        )
        for pid in chosen:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # someone else collected it meanwhile
            if got == pid:
                self._first_seen.pop(pid, None)
                self.reaped.append((pid, status))
                del self.reaped[:-100]
                log.debug("reaped orphan %d (status %d)", pid, status)
        return bool(self._first_seen)
