"""The sequencer: runs one sequence at a time, phase by phase.

A sequence is data: ``sequence("reboot").then("stop", stop_services).then(...)``. Tasks
of one phase run concurrently; phases run in order; a phase with ``when`` is skipped
when its condition is false. A request for a sequence while another runs is refused
with :class:`SequenceConflictError`, unless :data:`TAKEOVER` lets the new one cancel
the running one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from basalt.machinery.errors import BasaltError

log = logging.getLogger(__name__)

N = TypeVar("N")
Task = Callable[[N, Any], Awaitable[None]]
Condition = Callable[[N, Any], bool]

#: running sequence -> sequences that may cancel it and run instead.
#: Boot can wait a long time (maintenance mode, a control plane to sign a certificate);
#: reboot, shutdown and reset take it over. Nothing takes over reboot, shutdown or reset
#: except shutdown taking over reboot (a power-off beats a restart).
TAKEOVER: dict[str, frozenset[str]] = {
    "boot": frozenset({"reboot", "shutdown", "reset"}),
    "apply-config": frozenset(),
    "reboot": frozenset({"shutdown"}),
    "shutdown": frozenset(),
    "reset": frozenset(),
}


class SequenceConflictError(BasaltError):
    """Another sequence is running and this one may not take it over."""

    def __init__(self, running: str, requested: str) -> None:
        super().__init__(
            f"sequence {running!r} is running; {requested!r} cannot start now",
            hint="wait for it to finish (basaltctl events -f), then retry",
        )
        self.running = running
        self.requested = requested


@dataclass(frozen=True)
class Phase(Generic[N]):
    name: str
    tasks: tuple[Task[N], ...]
    when: Condition[N] | None = None


@dataclass(frozen=True)
class Sequence(Generic[N]):
    name: str
    phases: tuple[Phase[N], ...] = field(default=())

    def then(self, name: str, *tasks: Task[N], when: Condition[N] | None = None) -> Sequence[N]:
        return Sequence(self.name, (*self.phases, Phase(name, tasks, when)))

    def describe(self) -> list[str]:
        """One line per phase: ``name: task, task [when cond]``."""
        lines = []
        for phase in self.phases:
            names = ", ".join(getattr(t, "__name__", repr(t)) for t in phase.tasks)
            cond = f" [when {getattr(phase.when, '__name__', 'condition')}]" if phase.when else ""
            lines.append(f"{phase.name}: {names}{cond}")
        return lines


def sequence(name: str) -> Sequence[Any]:
    return Sequence(name)


class Sequencer(Generic[N]):
    """Runs sequences for ``node``; ``on_event(sequence, phase, message)`` reports progress."""

    def __init__(self, node: N, on_event: Callable[[str, str, str], None]) -> None:
        self.node = node
        self._on_event = on_event
        self._running: tuple[str, asyncio.Task[None]] | None = None

    @property
    def running(self) -> str | None:
        return self._running[0] if self._running else None

    def start(self, seq: Sequence[N], request: Any = None) -> asyncio.Task[None]:
        """Start ``seq`` in the background, or raise SequenceConflictError right away."""
        if self._running is not None:
            name, task = self._running
            if seq.name not in TAKEOVER.get(name, frozenset()):
                raise SequenceConflictError(name, seq.name)
            self._on_event(name, "", f"taken over by {seq.name}")
            task.cancel()
        task = asyncio.create_task(self._run(seq, request), name=f"sequence:{seq.name}")
        self._running = (seq.name, task)
        task.add_done_callback(lambda t: self._finished(seq.name, t))
        return task

    def _finished(self, name: str, task: asyncio.Task[None]) -> None:
        if self._running is not None and self._running[1] is task:
            self._running = None

    async def _run(self, seq: Sequence[N], request: Any) -> None:
        self._on_event(seq.name, "", "started")
        try:
            for phase in seq.phases:
                if phase.when is not None and not phase.when(self.node, request):
                    continue
                self._on_event(seq.name, phase.name, "phase started")
                await asyncio.gather(*(task(self.node, request) for task in phase.tasks))
            self._on_event(seq.name, "", "finished")
        except asyncio.CancelledError:
            self._on_event(seq.name, "", "cancelled")
            raise
        except Exception as exc:
            self._on_event(seq.name, "", f"failed: {type(exc).__name__}: {exc}")
            log.exception("sequence %s failed", seq.name)
            raise
