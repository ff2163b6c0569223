"""Controllers: declared inputs and outputs, and a reconcile run on every input change.

The engine runs each controller once at start and again whenever a resource type it
declares as input changes (changes that arrive during a run coalesce into one more run).
A failing reconcile is retried with backoff and reported as an event; it never stops
the node.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import ClassVar

from .store import ResourceStore

log = logging.getLogger(__name__)


class Controller(ABC):
    """One domain's reconcile loop. Subclasses declare ``name``, ``inputs`` and ``outputs``."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    async def reconcile(self, store: ResourceStore) -> None:
        """Read inputs from the store (and the world), write outputs. Must be idempotent."""


class ControllerEngine:
    def __init__(
        self,
        store: ResourceStore,
        controllers: list[Controller],
        *,
        backoff_max: float = 10.0,
    ) -> None:
        self.store = store
        self.controllers = controllers
        self._wakeups: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._backoff_max = backoff_max
        self.errors: dict[str, str] = {}

    def start(self) -> None:
        for controller in self.controllers:
            wake = asyncio.Event()
            wake.set()
            self._wakeups[controller.name] = wake
            for type_ in controller.inputs:
                self.store.on_change(type_, wake.set)
            self._tasks.append(
                asyncio.create_task(
                    self._run(controller, wake), name=f"controller:{controller.name}"
                )
            )

    def kick(self, name: str) -> None:
        """Run controller ``name`` again (for inputs that are not resources)."""
        self._wakeups[name].set()

    async def _run(self, controller: Controller, wake: asyncio.Event) -> None:
        backoff = 0.1
        while True:
            await wake.wait()
            wake.clear()
            try:
                await controller.reconcile(self.store)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors[controller.name] = f"{type(exc).__name__}: {exc}"
                log.warning("controller %s failed: %s", controller.name, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                wake.set()
            else:
                self.errors.pop(controller.name, None)
                backoff = 0.1

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
