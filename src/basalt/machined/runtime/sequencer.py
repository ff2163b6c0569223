"""The sequencer: runs one sequence at a time, phase by phase.

A sequence is data: ``sequence("reboot").then("stop", stop_services).then(...)``; the
node's sequences (:mod:`basalt.machined.sequencer.sequences`) are registered by the
composition root and started by name: ``node.sequencer.start("reboot")``. Tasks
of one phase run concurrently; phases run in order; a phase with ``when`` is skipped
when its condition is false. A request for a sequence while another runs is refused
with :class:`SequenceConflictError`, unless :data:`TAKEOVER` lets the new one cancel
the running one; the new one starts once the cancelled one has unwound. When a task
fails, the other tasks of its phase are cancelled and the sequence fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, get_args

from basalt.machinery.errors import BasaltError

log = logging.getLogger(__name__)

N = TypeVar("N")
Task = Callable[[N, Any], Awaitable[None]]
Condition = Callable[[N, Any], bool]

#: The node's sequences, by name.
SequenceName = Literal["boot", "apply-config", "upgrade", "rollback", "reboot", "shutdown", "reset"]
SEQUENCE_NAMES: tuple[SequenceName, ...] = get_args(SequenceName)

#: running sequence -> sequences that may cancel it and run instead.
#: Boot can wait a long time (maintenance mode, a control plane to sign a certificate);
#: reboot, shutdown and reset take it over. Nothing takes over reboot, shutdown or reset
#: except shutdown taking over reboot (a power-off beats a restart). An upgrade or a
#: rollback is short and changes which slot boots: nothing takes it over.
TAKEOVER: dict[str, frozenset[SequenceName]] = {
    "boot": frozenset({"reboot", "shutdown", "reset"}),
    "apply-config": frozenset(),
    "upgrade": frozenset(),
    "rollback": frozenset(),
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
        self._sequences: dict[str, Sequence[N]] = {}
        self._running: tuple[str, asyncio.Task[None]] | None = None
        #: Every sequence task not yet done, including taken-over ones still unwinding.
        self._live: set[asyncio.Task[None]] = set()

    def register(self, sequences: Mapping[SequenceName, Sequence[N]]) -> None:
        """Make ``sequences`` startable by name (the composition root does this once)."""
        for name, seq in sequences.items():
            if seq.name != name:
                raise ValueError(f"sequence {seq.name!r} registered as {name!r}")
            self._sequences[name] = seq

    @property
    def running(self) -> str | None:
        return self._running[0] if self._running else None

    def start(self, what: SequenceName | Sequence[N], request: Any = None) -> asyncio.Task[None]:
        """Start a registered sequence (by name) or ``what`` itself in the background, or
        raise SequenceConflictError right away."""
        if isinstance(what, Sequence):
            seq = what
        else:
            found = self._sequences.get(what)
            if found is None:
                raise KeyError(f"no sequence {what!r} is registered")
            seq = found
        if self._running is not None:
            name, task = self._running
            if seq.name not in TAKEOVER.get(name, frozenset()):
                raise SequenceConflictError(name, seq.name)
            self._on_event(name, "", f"taken over by {seq.name}")
            task.cancel()
        previous = tuple(self._live)
        task = asyncio.create_task(self._run(seq, request, previous), name=f"sequence:{seq.name}")
        self._running = (seq.name, task)
        self._live.add(task)
        task.add_done_callback(lambda t: self._finished(seq.name, t))
        return task

    def _finished(self, name: str, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            task.exception()  # reported by _run already; no "never retrieved" trace at GC
        self._live.discard(task)
        if self._running is not None and self._running[1] is task:
            self._running = None

    async def _run(
        self, seq: Sequence[N], request: Any, previous: tuple[asyncio.Task[None], ...] = ()
    ) -> None:
        try:
            if previous:
                # One sequence at a time: a taken-over sequence finishes unwinding first.
                await asyncio.wait(previous)
            self._on_event(seq.name, "", "started")
            for phase in seq.phases:
                if phase.when is not None and not phase.when(self.node, request):
                    continue
                self._on_event(seq.name, phase.name, "phase started")
                await self._run_phase(phase, request)
            self._on_event(seq.name, "", "finished")
        except asyncio.CancelledError:
            self._on_event(seq.name, "", "cancelled")
            raise
        except BasaltError as exc:  # an expected refusal: one line with the reason
            self._on_event(seq.name, "", f"refused: {exc.one_line()}")
            log.warning("sequence %s refused: %s", seq.name, exc.one_line())
            raise
        except Exception as exc:  # a bug: the trace is for us
            self._on_event(seq.name, "", f"failed: {type(exc).__name__}: {exc}")
            log.exception("sequence %s failed", seq.name)
            raise

    async def _run_phase(self, phase: Phase[N], request: Any) -> None:
        tasks = [asyncio.ensure_future(task(self.node, request)) for task in phase.tasks]
        if not tasks:
            return
        try:
            await asyncio.gather(*tasks)
        finally:
            # A failed or cancelled phase is over: its other tasks must not outlive it.
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
