"""The build queue: one build at a time, each image built once however many ask.

A request for an image that is neither built nor queued appends it to the queue; a
request for one that is queued or building joins it (the same :class:`Build`), so two
clients asking for the same schematic and version at once start one build. One worker
thread takes builds in order and runs each through a :data:`BuildFunction` (the factory's
runs the imager in a child process, off the server's event loop and its GIL), which
reports its progress (the stage being built, stages done of the total) as it goes.

A failed build stays failed (with its error) until someone asks for it again with
``retry``: a build that fails for good must not restart on every poll.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger("basalt.factory")

BuildState = Literal["queued", "building", "done", "failed"]


@dataclass(frozen=True)
class BuildKey:
    """One image: a schematic (its id) built for one Basalt version."""

    schematic: str
    version: str

    def __str__(self) -> str:
        return f"{self.schematic[:16]}…/{self.version}"


class BuildCancelled(Exception):
    """The factory is shutting down: the build was stopped (and may run again later)."""


@dataclass
class Progress:
    """What a build function reports as it goes; read by status requests."""

    stage: str | None = None
    done: int = 0
    total: int = 0
    #: Set when the factory closes: the build function stops and raises BuildCancelled.
    cancel: threading.Event = field(default_factory=threading.Event)


#: Builds one image, reporting into the Progress; returns the stages it went through
#: ([{stage, result: built|cached, seconds}]); raises (a BasaltError, with its hint) on
#: failure.
BuildFunction = Callable[[BuildKey, Progress], list[dict[str, Any]]]


@dataclass
class Build:
    """The factory's memory of one image's builds (since it started)."""

    key: BuildKey
    state: BuildState = "queued"
    #: How many times a build of this image started.
    runs: int = 0
    progress: Progress = field(default_factory=Progress)
    error: str | None = None
    queued: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    #: The stages of the last build that finished: [{stage, result, seconds}].
    stages: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class BuildStatus:
    """A snapshot of one image's build, as the status route answers it."""

    schematic: str
    version: str
    state: BuildState | Literal["none"]
    #: 1: the next to build; None unless queued.
    position: int | None = None
    stage: str | None = None
    stages_done: int = 0
    stages_total: int = 0
    runs: int = 0
    error: str | None = None
    seconds: float | None = None
    stages: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "schematic": self.schematic,
            "version": self.version,
            "state": self.state,
            "position": self.position,
            "stage": self.stage,
            "stagesDone": self.stages_done,
            "stagesTotal": self.stages_total,
            "builds": self.runs,
            "error": self.error,
            "seconds": self.seconds,
            "stages": list(self.stages),
        }


class BuildQueue:
    """Builds in order, one at a time, by one worker thread (started on first use)."""

    def __init__(self, run: BuildFunction, is_built: Callable[[BuildKey], bool]) -> None:
        self._run = run
        self._is_built = is_built
        self._lock = threading.Condition()
        self._builds: dict[BuildKey, Build] = {}
        self._queue: collections.deque[BuildKey] = collections.deque()
        self._current: BuildKey | None = None
        self._worker: threading.Thread | None = None
        self._closed = False

    def request(self, key: BuildKey, *, retry: bool = False) -> BuildStatus:
        """Queue ``key`` unless it is built, queued or building (or failed, without
        ``retry``); its status either way."""
        with self._lock:
            build = self._builds.get(key)
            if build is not None and build.state in ("queued", "building"):
                return self._status(key)
            if build is not None and build.state == "failed" and not retry:
                return self._status(key)
            if not retry and self._is_built(key):
                return self._status(key)
            if self._closed:
                raise BuildCancelled("the factory is shutting down")
            if build is None:
                build = self._builds[key] = Build(key)
            build.state, build.error, build.queued = "queued", None, time.time()
            build.progress = Progress()
            self._queue.append(key)
            self._start_worker()
            self._lock.notify_all()
            log.info("image %s: queued (%d in the queue)", key, len(self._queue))
            return self._status(key)

    def status(self, key: BuildKey) -> BuildStatus:
        with self._lock:
            return self._status(key)

    def _status(self, key: BuildKey) -> BuildStatus:
        build = self._builds.get(key)
        if build is None:
            state: BuildState | Literal["none"] = "done" if self._is_built(key) else "none"
            return BuildStatus(key.schematic, key.version, state)
        position = self._queue.index(key) + 1 if build.state == "queued" else None
        progress = build.progress
        if build.started is None:
            seconds = None
        else:
            seconds = round((build.finished or time.time()) - build.started, 1)
        return BuildStatus(
            key.schematic,
            key.version,
            build.state,
            position=position,
            stage=progress.stage if build.state == "building" else None,
            stages_done=progress.done,
            stages_total=progress.total,
            runs=build.runs,
            error=build.error,
            seconds=seconds,
            stages=tuple(build.stages),
        )

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="factory-builds", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                key = self._queue.popleft()
                build = self._builds[key]
                build.state, build.runs = "building", build.runs + 1
                build.started, build.finished = time.time(), None
                self._current = key
                progress = build.progress
            log.info("image %s: building (build %d)", key, build.runs)
            try:
                stages = self._run(key, progress)
            except BuildCancelled:
                with self._lock:
                    build.state, build.error = "failed", "cancelled: the factory shut down"
                    build.finished, self._current = time.time(), None
                return
            except Exception as exc:  # any failure is the build's, reported by status
                from basalt.machinery.errors import BasaltError

                text = (
                    exc.render() if isinstance(exc, BasaltError) else f"{type(exc).__name__}: {exc}"
                )
                log.warning("image %s: build failed: %s", key, text.splitlines()[0])
                with self._lock:
                    build.state, build.error = "failed", text
                    build.finished, self._current = time.time(), None
                continue
            with self._lock:
                build.state, build.stages = "done", stages
                build.finished, self._current = time.time(), None
            log.info("image %s: built in %.1f s", key, build.finished - (build.started or 0))

    def close(self, timeout: float = 10.0) -> None:
        """Stop: the build under way is cancelled, the queued ones are dropped."""
        with self._lock:
            self._closed = True
            for key in self._queue:
                self._builds[key].state = "failed"
                self._builds[key].error = "cancelled: the factory shut down"
            self._queue.clear()
            if self._current is not None:
                self._builds[self._current].progress.cancel.set()
            self._lock.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(timeout)


__all__ = [
    "Build",
    "BuildCancelled",
    "BuildFunction",
    "BuildKey",
    "BuildQueue",
    "BuildState",
    "BuildStatus",
    "Progress",
]
