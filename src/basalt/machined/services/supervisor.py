"""The service supervisor: one asyncio task per service drives it through its states.

A service's task waits for its dependencies and conditions (WAITING), runs the spec's
prepare step (PREPARING), launches the runner (STARTING), watches it and its health
(RUNNING), records how it ended (FINISHED or FAILED) and restarts it per its policy,
with exponential backoff. Stopping cancels that task; the task then stops the run
(STOPPING) and records FINISHED. Every change is published on the event bus (type
``service``, actor = service id) and passed to ``on_change``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from basalt.machined.events import EventBus
from basalt.machined.services.logs import LogBuffer
from basalt.machined.services.runners import ExitStatus, Running
from basalt.machined.services.service import (
    STARTUP_PERIOD,
    STARTUP_RETRY,
    STARTUP_RETRY_MAX,
    Condition,
    HealthCheck,
    ServiceSpec,
    ServiceState,
)
from basalt.machinery.errors import BasaltError, ErrorKind

__all__ = ["Health", "ServiceEvent", "ServiceStatus", "Supervisor", "UnknownServiceError"]

log = logging.getLogger(__name__)

Health = Literal["healthy", "unhealthy", "unknown"]

EVENT_TYPE = "service"
HISTORY = 20  # transitions kept per service in ServiceStatus.events


class UnknownServiceError(BasaltError):
    """A service id that is not registered was asked for; the hint lists the known ones."""

    kind = ErrorKind.NOT_FOUND

    def __init__(self, service_id: str, known: Iterable[str]) -> None:
        names = ", ".join(sorted(known)) or "none"
        super().__init__(f"unknown service {service_id!r}", hint=f"registered services: {names}")
        self.service_id = service_id


@dataclass(frozen=True)
class ServiceEvent:
    """One transition (or health change) of a service."""

    state: ServiceState
    message: str
    timestamp: float


@dataclass(frozen=True)
class ServiceStatus:
    """A snapshot of one service: what ``basaltctl services`` shows."""

    id: str
    state: ServiceState
    health: Health
    message: str
    pid: int
    restarts: int
    events: tuple[ServiceEvent, ...]
    health_message: str = ""


class _PhaseError(Exception):
    """A run ended before it started: a condition, prepare or launch failed."""


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    message: str
    uptime: float


class _Unit:
    """The supervisor's mutable record of one service."""

    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        self.log = LogBuffer(max_lines=spec.log_lines)
        self.state = ServiceState.WAITING
        self.message = "not started"
        self.health: Health = "unknown"
        self.health_message = ""
        self.pid = 0
        self.restarts = 0
        self.events: deque[ServiceEvent] = deque(maxlen=HISTORY)
        self.task: asyncio.Task[None] | None = None
        self.running: Running | None = None
        self.stopping = False

    @property
    def ready(self) -> bool:
        """Running, and healthy if it has a health check: what dependents wait for."""
        if self.state != ServiceState.RUNNING:
            return False
        return self.spec.health_check is None or self.health == "healthy"

    def snapshot(self) -> ServiceStatus:
        return ServiceStatus(
            id=self.spec.id,
            state=self.state,
            health=self.health,
            message=self.message,
            pid=self.pid,
            restarts=self.restarts,
            events=tuple(self.events),
            health_message=self.health_message,
        )


class Supervisor:
    """Runs registered services; see the module docstring for the life of one.

    A service that was stopped stays stopped until :meth:`start` is called again.
    Dependents are not stopped when a dependency goes down; :meth:`stop_all` stops
    dependents before what they depend on.
    """

    def __init__(
        self, events: EventBus, on_change: Callable[[ServiceStatus], None] | None = None
    ) -> None:
        self._bus = events
        self._on_change = on_change
        self._units: dict[str, _Unit] = {}
        self._changed = asyncio.Event()

    # -- registry and queries -------------------------------------------------------

    def register(self, spec: ServiceSpec) -> None:
        """Add a service (not started). Raises ValueError for a duplicate id or a cycle."""
        if spec.id in self._units:
            raise ValueError(f"service {spec.id!r} is already registered")
        if cycle := self._cycle_through(spec):
            raise ValueError(f"service dependencies form a cycle: {' -> '.join(cycle)}")
        self._units[spec.id] = _Unit(spec)
        self._notify()

    def status(self, service_id: str) -> ServiceStatus:
        return self._unit(service_id).snapshot()

    def statuses(self) -> list[ServiceStatus]:
        """Every service, in registration order."""
        return [unit.snapshot() for unit in self._units.values()]

    def logs(self, service_id: str) -> LogBuffer:
        """The service's log buffer; it is kept across restarts."""
        return self._unit(service_id).log

    def _unit(self, service_id: str) -> _Unit:
        try:
            return self._units[service_id]
        except KeyError:
            raise UnknownServiceError(service_id, self._units) from None

    def _cycle_through(self, spec: ServiceSpec) -> list[str] | None:
        def deps(service_id: str) -> tuple[str, ...]:
            if service_id == spec.id:
                return spec.depends_on
            unit = self._units.get(service_id)
            return unit.spec.depends_on if unit else ()

        def search(path: list[str]) -> list[str] | None:
            for dep in deps(path[-1]):
                if dep == spec.id:
                    return [*path, dep]
                if dep not in path and (found := search([*path, dep])):
                    return found
            return None

        return search([spec.id])

    # -- control --------------------------------------------------------------------

    async def start(self, service_id: str) -> None:
        """Start driving the service; a no-op when it is already being driven.

        When a stop of the service is in progress, waits for it, then starts it again.
        """
        unit = self._unit(service_id)
        if unit.task is not None and not unit.task.done():
            if not unit.stopping:
                return
            await asyncio.wait({unit.task})
            if unit.task is not None and not unit.task.done():
                return  # a concurrent start() got there first
        unit.restarts = 0
        unit.stopping = False
        unit.task = asyncio.create_task(self._drive(unit), name=f"service {service_id}")

    async def stop(self, service_id: str) -> None:
        """Stop the service and wait until it has; it stays stopped until started."""
        unit = self._unit(service_id)
        task = unit.task
        if task is None or task.done():
            return
        if not unit.stopping:
            unit.stopping = True
            task.cancel()
        await asyncio.wait({task})
        if unit.task is task and not unit.state.terminal:  # cancelled before its first step
            self._transition(unit, ServiceState.FINISHED, "stopped")

    async def restart(self, service_id: str) -> None:
        await self.stop(service_id)
        await self.start(service_id)

    async def start_all(self) -> None:
        """Start every registered service; each waits for its own dependencies."""
        for service_id in list(self._units):
            await self.start(service_id)

    async def stop_all(self) -> None:
        """Stop every service, dependents before their dependencies."""
        for layer in self._stop_layers():
            await asyncio.gather(*(self.stop(service_id) for service_id in layer))

    def _stop_layers(self) -> list[list[str]]:
        """Layer 0: services nothing depends on; layer n+1: what layer n depends on."""
        dependents: dict[str, list[str]] = {service_id: [] for service_id in self._units}
        for unit in self._units.values():
            for dep in unit.spec.depends_on:
                if dep in dependents:
                    dependents[dep].append(unit.spec.id)
        height: dict[str, int] = {}

        def measure(service_id: str) -> int:
            if service_id not in height:
                above = [measure(d) for d in dependents[service_id]]
                height[service_id] = 1 + max(above) if above else 0
            return height[service_id]

        layers: list[list[str]] = []
        for service_id in self._units:
            level = measure(service_id)
            layers.extend([] for _ in range(level + 1 - len(layers)))
            layers[level].append(service_id)
        return layers

    # -- the driver -----------------------------------------------------------------

    async def _drive(self, unit: _Unit) -> None:
        spec = unit.spec
        try:
            if (reason := self._skip_reason(unit)) is not None:
                self._transition(unit, ServiceState.SKIPPED, reason)
                return
            delay = spec.backoff_initial
            while True:
                outcome = await self._run_once(unit)
                if outcome.uptime >= spec.backoff_reset_after:
                    delay = spec.backoff_initial
                again = spec.restart.restarts(ok=outcome.ok)
                message = outcome.message + (f"; restarting in {delay:g}s" if again else "")
                state = ServiceState.FINISHED if outcome.ok else ServiceState.FAILED
                self._transition(unit, state, message)
                if not again:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, spec.backoff_max)
                unit.restarts += 1
        except asyncio.CancelledError:
            await self._stopped(unit)
            raise
        except _PhaseError as exc:
            self._transition(unit, ServiceState.FAILED, str(exc))
        except Exception as exc:  # a bug here must not leave the service looking alive
            log.exception("supervisor of service %s failed", spec.id)
            self._transition(unit, ServiceState.FAILED, f"supervisor error: {exc!r}")

    @staticmethod
    def _skip_reason(unit: _Unit) -> str | None:
        if unit.spec.skip_reason is None:
            return None
        try:
            return unit.spec.skip_reason()
        except Exception as exc:
            raise _PhaseError(f"skip check failed: {_describe(exc)}") from exc

    async def _stopped(self, unit: _Unit) -> None:
        running, unit.running = unit.running, None
        if running is None:
            self._transition(unit, ServiceState.FINISHED, "stopped")
            return
        self._transition(unit, ServiceState.STOPPING, "stopping")
        # Shielded: a second cancellation must not leave the process half-stopped.
        status = await asyncio.shield(asyncio.ensure_future(running.stop()))
        unit.pid = 0
        unit.health = "unknown"
        self._transition(unit, ServiceState.FINISHED, f"stopped ({status.describe()})")

    async def _run_once(self, unit: _Unit) -> _Outcome:
        spec = unit.spec
        try:
            await self._wait_ready(unit)
            if spec.prepare is not None:
                self._transition(unit, ServiceState.PREPARING, "preparing")
                try:
                    await spec.prepare()
                except Exception as exc:
                    raise _PhaseError(f"prepare failed: {_describe(exc)}") from exc
            self._transition(unit, ServiceState.STARTING, "starting")
            log_mark = unit.log.total
            running = await self._launch(unit)
        except _PhaseError as exc:
            return _Outcome(ok=False, message=str(exc), uptime=0.0)

        loop = asyncio.get_running_loop()
        started = loop.time()
        unit.pid = running.pid
        self._transition(
            unit, ServiceState.RUNNING, f"running (pid {unit.pid})" if unit.pid else "running"
        )
        health = self._watch_health(unit, spec.health_check) if spec.health_check else None
        try:
            status = await running.wait()
        finally:
            if health is not None:
                health.cancel()
        unit.running = None
        unit.pid = 0
        unit.health = "unknown"
        return _Outcome(
            status.ok, self._exit_message(unit, status, log_mark), loop.time() - started
        )

    async def _launch(self, unit: _Unit) -> Running:
        starting = asyncio.ensure_future(unit.spec.runner.start(unit.log))
        try:
            running = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Let the launch finish so that the stop path can stop what it launched.
            with contextlib.suppress(Exception):
                unit.running = await starting
            raise
        except Exception as exc:
            raise _PhaseError(f"cannot start: {_describe(exc)}") from exc
        unit.running = running
        return running

    @staticmethod
    def _exit_message(unit: _Unit, status: ExitStatus, log_mark: int) -> str:
        message = status.describe()
        if status.ok or status.error is not None or unit.log.total <= log_mark:
            return message
        last = unit.log.lines(tail=1)[0].decode("utf-8", "replace").strip()
        return f"{message}; last log line: {last}" if last else message

    async def _wait_ready(self, unit: _Unit) -> None:
        """Wait (in WAITING) until every dependency is ready and every condition holds."""
        pending = {asyncio.ensure_future(c.wait()): c for c in unit.spec.conditions}
        try:
            while True:
                for task in [t for t in pending if t.done()]:
                    condition = pending.pop(task)
                    if (exc := task.exception()) is not None:
                        message = f"condition '{condition.description}' failed: {_describe(exc)}"
                        raise _PhaseError(message)
                deps = [d for d in unit.spec.depends_on if not self._ready(d)]
                if not deps and not pending:
                    return
                message = self._waiting_message(deps, pending.values())
                if unit.state != ServiceState.WAITING or unit.message != message:
                    self._transition(unit, ServiceState.WAITING, message)
                changed = asyncio.ensure_future(self._changed.wait())
                try:
                    await asyncio.wait({changed, *pending}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
        finally:
            for task in pending:
                task.cancel()

    def is_ready(self, service_id: str) -> bool:
        """Running, and healthy if it has a health check (what dependents wait for)."""
        return self._ready(service_id)

    def _ready(self, service_id: str) -> bool:
        unit = self._units.get(service_id)
        return unit is not None and unit.ready

    def _waiting_message(self, deps: list[str], conditions: Iterable[Condition]) -> str:
        parts = [f"service {dep}{self._why_not_ready(dep)}" for dep in deps]
        parts += [f"condition '{c.description}'" for c in conditions]
        return "waiting for " + ", ".join(parts)

    def _why_not_ready(self, service_id: str) -> str:
        unit = self._units.get(service_id)
        if unit is None:
            return " (not registered)"
        if unit.state == ServiceState.RUNNING:
            return " (not healthy yet)"
        if unit.state.terminal or unit.state == ServiceState.STOPPING:
            return f" ({unit.state})"
        return ""

    def _watch_health(self, unit: _Unit, check: HealthCheck) -> asyncio.Task[None]:
        async def watch() -> None:
            await asyncio.sleep(check.initial_delay)
            pause = min(STARTUP_RETRY, check.interval)  # until it first passes
            passed = False
            starting_until = time.monotonic() + STARTUP_PERIOD
            while True:
                try:
                    await asyncio.wait_for(check.check(), check.timeout)
                except TimeoutError:
                    self._set_health(unit, "unhealthy", f"timed out after {check.timeout:g}s")
                except Exception as exc:
                    self._set_health(unit, "unhealthy", str(exc) or type(exc).__name__)
                else:
                    self._set_health(unit, "healthy", "")
                    passed = True
                if passed or time.monotonic() > starting_until:
                    await asyncio.sleep(check.interval)
                else:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, STARTUP_RETRY_MAX, check.interval)

        return asyncio.create_task(watch(), name=f"health of service {unit.spec.id}")

    # -- recording ------------------------------------------------------------------

    def _set_health(self, unit: _Unit, health: Health, message: str) -> None:
        unit.health_message = message
        if health == unit.health:
            return
        unit.health = health
        text = "health check passed" if health == "healthy" else f"health check failed: {message}"
        self._record(unit, text)

    def _transition(self, unit: _Unit, state: ServiceState, message: str) -> None:
        unit.state = state
        unit.message = message
        self._record(unit, message)

    def _record(self, unit: _Unit, message: str) -> None:
        event = self._bus.publish(
            EVENT_TYPE,
            message,
            actor=unit.spec.id,
            state=unit.state,
            health=unit.health,
            pid=str(unit.pid),
        )
        unit.events.append(ServiceEvent(unit.state, message, event.timestamp))
        self._notify()
        if self._on_change is not None:
            try:
                self._on_change(unit.snapshot())
            except Exception:
                log.exception("on_change callback failed for service %s", unit.spec.id)

    def _notify(self) -> None:
        """Wake everything waiting on a dependency; they re-check and wait again."""
        self._changed.set()
        self._changed = asyncio.Event()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError) and text:  # already says what and where
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
