"""What a service is: its states, restart policy, conditions, health check and spec."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from basalt.machined.services.runners import Runner

__all__ = [
    "Condition",
    "FlagCondition",
    "HealthCheck",
    "RestartPolicy",
    "ServiceSpec",
    "ServiceState",
]


class ServiceState(StrEnum):
    """Where a service is in its life; the supervisor moves it from one to the next."""

    WAITING = "waiting"  # for dependencies and conditions (or not started yet)
    PREPARING = "preparing"  # running the spec's prepare step
    STARTING = "starting"  # launching the runner
    RUNNING = "running"
    STOPPING = "stopping"  # stop requested; signalled, waiting for exit
    FINISHED = "finished"  # exited with code 0, or stopped on request
    FAILED = "failed"  # exited otherwise, or could not be prepared or started
    SKIPPED = "skipped"  # the spec's skip_reason said so; never started

    @property
    def terminal(self) -> bool:
        """True when no task drives the service any more (until it is started again)."""
        return self in (ServiceState.FINISHED, ServiceState.FAILED, ServiceState.SKIPPED)


class RestartPolicy(StrEnum):
    """When the supervisor starts a service again after it exited on its own."""

    ALWAYS = "always"
    ON_FAILURE = "on_failure"
    NEVER = "never"

    def restarts(self, *, ok: bool) -> bool:
        return self is RestartPolicy.ALWAYS or (self is RestartPolicy.ON_FAILURE and not ok)


class Condition(Protocol):
    """Something outside the service layer that must hold before a service starts."""

    @property
    def description(self) -> str:
        """Short words for the waiting message, e.g. ``network ready``."""
        ...

    async def wait(self) -> None:
        """Return once the condition holds; raise to fail the start attempt."""
        ...


class FlagCondition:
    """A condition that some other part of machined sets, e.g. when the network is up."""

    def __init__(self, description: str) -> None:
        self._description = description
        self._flag = asyncio.Event()

    def __repr__(self) -> str:
        return f"FlagCondition({self._description!r}, set={self._flag.is_set()})"

    @property
    def description(self) -> str:
        return self._description

    def set(self) -> None:
        self._flag.set()

    def clear(self) -> None:
        self._flag.clear()

    def is_set(self) -> bool:
        return self._flag.is_set()

    async def wait(self) -> None:
        await self._flag.wait()


#: Seconds before the second health check of a service that has not passed one yet
#: (doubling each time, up to STARTUP_RETRY_MAX and never beyond the check's interval).
STARTUP_RETRY = 0.25
STARTUP_RETRY_MAX = 1.0
#: Seconds after its start during which a service not healthy yet is checked that often;
#: then every interval (a service that never comes up is not probed every second).
STARTUP_PERIOD = 60.0


@dataclass(frozen=True)
class HealthCheck:
    """A periodic probe of a running service.

    ``check`` returns when the service is healthy and raises (with a message saying
    what is wrong) when it is not; a check that takes longer than ``timeout`` seconds
    counts as a failure. The first check runs ``initial_delay`` seconds after start.
    Until a check first passes, the next comes sooner than ``interval``
    (:data:`STARTUP_RETRY`, doubling up to :data:`STARTUP_RETRY_MAX`, for the first
    :data:`STARTUP_PERIOD` seconds): whatever waits for a service that has just started
    (a dependent service, readiness, an upgraded slot's health gates) learns it is
    healthy within a second, not up to ``interval`` late.
    """

    check: Callable[[], Awaitable[None]]
    interval: float = 5.0
    timeout: float = 2.0
    initial_delay: float = 0.0

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0 or self.initial_delay < 0:
            raise ValueError("health check needs interval > 0, timeout > 0, initial_delay >= 0")


@dataclass(frozen=True)
class ServiceSpec:
    """Everything the supervisor needs to run one service.

    ``depends_on`` names services that must be RUNNING (and healthy, when they have a
    health check) before this one starts. ``skip_reason`` is asked once per start: a
    string means the service is SKIPPED with that reason. Restarts wait
    ``backoff_initial`` seconds, doubling up to ``backoff_max``; the delay goes back to
    ``backoff_initial`` once a run stayed up ``backoff_reset_after`` seconds.
    """

    id: str
    runner: Runner
    depends_on: tuple[str, ...] = ()
    conditions: tuple[Condition, ...] = ()
    health_check: HealthCheck | None = None
    restart: RestartPolicy = RestartPolicy.ALWAYS
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    backoff_reset_after: float = 30.0
    skip_reason: Callable[[], str | None] | None = None
    prepare: Callable[[], Awaitable[None]] | None = None
    log_lines: int = 2000

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a service needs a non-empty id")
        if self.id in self.depends_on:
            raise ValueError(f"service {self.id!r} cannot depend on itself")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError(
                f"service {self.id!r}: need 0 < backoff_initial <= backoff_max, got "
                f"{self.backoff_initial} and {self.backoff_max}"
            )
        if self.log_lines < 1:
            raise ValueError(f"service {self.id!r}: log_lines must be at least 1")
