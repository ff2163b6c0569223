"""How a service runs: as a child process (:class:`ProcessRunner`) or an asyncio task.

A runner is configuration; :meth:`Runner.start` launches one run and returns a
:class:`Running` handle, which the supervisor waits on and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import traceback
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from basalt.machined.services.logs import LineSplitter, LogBuffer
from basalt.machinery.errors import BasaltError

__all__ = ["ExitStatus", "ProcessRunner", "Runner", "Running", "TaskRunner"]

_READ_CHUNK = 65536
_PIPE_DRAIN_TIMEOUT = 1.0  # after exit, how long to wait for output still in the pipe


@dataclass(frozen=True)
class ExitStatus:
    """How one run ended: an exit ``code``, a killing ``signal``, or a task ``error``."""

    code: int | None = None
    signal: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.signal is None and self.error is None

    def describe(self) -> str:
        if self.error is not None:
            return self.error
        if self.signal is not None:
            return f"killed by signal {_signal_name(self.signal)}"
        return f"exited with code {self.code}"


class Running(Protocol):
    """One run of a service, as the supervisor sees it."""

    @property
    def pid(self) -> int:
        """The process id, or 0 when the service is not a process."""
        ...

    async def wait(self) -> ExitStatus:
        """Return how the run ended, once it has."""
        ...

    async def stop(self) -> ExitStatus:
        """End the run (gently, then by force after the runner's timeout); never hangs."""
        ...


class Runner(Protocol):
    """Starts runs of a service; holds no state about any one run."""

    async def start(self, log: LogBuffer) -> Running:
        """Launch a run whose output goes to ``log``; raise if it cannot be launched."""
        ...


class ProcessRunner:
    """Runs ``argv`` as a child process in its own session and process group.

    stdout and stderr both go, line by line, to the service's log. ``env`` replaces the
    environment when given (None inherits machined's). Stopping sends ``stop_signal``
    to the whole group, then SIGKILL after ``stop_timeout`` seconds. When the main
    process exits, whatever it left behind in its group is killed too.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout: float = 10.0,
    ) -> None:
        if not argv:
            raise ValueError("a process runner needs a non-empty argv")
        self.argv = tuple(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout

    def __repr__(self) -> str:
        return f"ProcessRunner({list(self.argv)!r})"

    async def start(self, log: LogBuffer) -> Running:
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        return _RunningProcess(proc, log, self.stop_signal, self.stop_timeout)


class _RunningProcess:
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        log: LogBuffer,
        stop_signal: signal.Signals,
        stop_timeout: float,
    ) -> None:
        self._proc = proc
        self._stop_signal = stop_signal
        self._stop_timeout = stop_timeout
        assert proc.stdout is not None
        self._pump = asyncio.create_task(_pump(proc.stdout, LineSplitter(log)))
        self._exited = asyncio.create_task(self._reap())

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def _reap(self) -> ExitStatus:
        code = await self._proc.wait()
        # The group outlives its leader if the leader left children behind; with the
        # leader reaped, its pid stays reserved as long as the group exists.
        self._signal_group(signal.SIGKILL)
        _, pending = await asyncio.wait({self._pump}, timeout=_PIPE_DRAIN_TIMEOUT)
        for task in pending:  # someone outside the group still holds the pipe
            task.cancel()
        if code < 0:
            return ExitStatus(signal=-code)
        return ExitStatus(code=code)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self._exited)

    async def stop(self) -> ExitStatus:
        if not self._exited.done():
            self._signal_group(self._stop_signal)
            _, pending = await asyncio.wait({self._exited}, timeout=self._stop_timeout)
            if pending:
                self._signal_group(signal.SIGKILL)
        return await asyncio.shield(self._exited)


async def _pump(stream: asyncio.StreamReader, lines: LineSplitter) -> None:
    try:
        while chunk := await stream.read(_READ_CHUNK):
            lines.feed(chunk)
    finally:
        lines.flush()


class TaskRunner:
    """Runs an in-process service: ``func(log)`` as an asyncio task.

    Returning is exit code 0; raising is a failure (the traceback goes to the log).
    Stopping cancels the task and waits up to ``stop_timeout`` seconds for it to end.
    """

    def __init__(
        self,
        func: Callable[[LogBuffer], Coroutine[Any, Any, None]],
        *,
        stop_timeout: float = 10.0,
    ) -> None:
        self.func = func
        self.stop_timeout = stop_timeout

    def __repr__(self) -> str:
        return f"TaskRunner({getattr(self.func, '__qualname__', self.func)!r})"

    async def start(self, log: LogBuffer) -> Running:
        return _RunningTask(asyncio.create_task(self._run(log)), self.stop_timeout)

    async def _run(self, log: LogBuffer) -> ExitStatus:
        try:
            await self.func(log)
        except BasaltError as exc:  # an expected refusal: its reason, on one line
            log.append(exc.one_line().encode())
            return ExitStatus(error=exc.one_line())
        except Exception as exc:
            for chunk in traceback.format_exception(exc):
                for line in chunk.rstrip("\n").split("\n"):
                    log.append(line.encode())
            return ExitStatus(error=f"raised {type(exc).__name__}: {exc}")
        return ExitStatus(code=0)


class _RunningTask:
    def __init__(self, task: asyncio.Task[ExitStatus], stop_timeout: float) -> None:
        self._task = task
        self._stop_timeout = stop_timeout

    @property
    def pid(self) -> int:
        return 0

    async def wait(self) -> ExitStatus:
        await asyncio.wait({self._task})
        return self._status()

    async def stop(self) -> ExitStatus:
        if not self._task.done():
            self._task.cancel()
            _, pending = await asyncio.wait({self._task}, timeout=self._stop_timeout)
            if pending:
                return ExitStatus(
                    error=f"did not end within {self._stop_timeout:g}s of cancellation; "
                    "left running"
                )
        return self._status()

    def _status(self) -> ExitStatus:
        if self._task.cancelled():
            return ExitStatus(error="cancelled")
        return self._task.result()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
