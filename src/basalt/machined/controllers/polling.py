"""Controllers that publish what they read from the kernel every few seconds.

A :class:`PollingController` reads once when it reconciles (unless it must wait for the
API to open first), then again every ``interval`` seconds in a background task, and
publishes each type it reads as the whole set of its resources (what is gone is
removed). A reading that fails costs that reading, never the node: expected failures
(:attr:`expected`) are logged once until reads work again, anything else each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from basalt.machinery.resources import Spec

from ..runtime import Controller, ResourceStore

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)
#: The longest a controller that waits for the API waits before reading anyway.
API_FIRST_TIMEOUT = 30.0


class PollingController(Controller):
    #: While a first boot's maintenance API is opening, the first reading waits for it
    #: (reads that are slow under emulation, or whose imports are); any other time, and
    #: for every later reconcile, it reads at once.
    after_api: ClassVar[bool] = False
    #: Failures that say the kernel cannot be read now, not that the code is wrong.
    expected: ClassVar[tuple[type[Exception], ...]] = (OSError,)

    def __init__(self, node: Node, interval: float) -> None:
        self.node = node
        self.interval = interval
        self._loop: asyncio.Task[None] | None = None
        self._failing = False

    @abstractmethod
    async def refresh(self, store: ResourceStore) -> None:
        """One reading into the store."""

    async def reconcile(self, store: ResourceStore) -> None:
        waits = self.after_api and not self.node.api_first.is_set()
        if not waits:
            await self.refresh(store)
        if self._loop is None:
            self._loop = self.node.background(self._read_forever(store, waits), name=self.name)

    def publish(self, store: ResourceStore, type_: str, specs: Mapping[str, Spec]) -> None:
        """``specs`` become every resource of ``type_`` this controller owns."""
        for id_, spec in specs.items():
            store.put(type_, id_, spec, owner=self.name)
        store.retain(type_, set(specs), owner=self.name)

    async def _read_forever(self, store: ResourceStore, first_waits: bool) -> None:
        if first_waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.node.api_first.wait(), API_FIRST_TIMEOUT)
        else:
            await asyncio.sleep(self.interval)  # reconcile has just read
        while True:
            try:
                await self.refresh(store)
            except self.expected as exc:
                if not self._failing:
                    log.warning("%s: cannot read: %s", self.name, exc)
                self._failing = True
            except Exception as exc:  # a bug here must cost a reading, never the node
                log.warning("%s: read failed: %s", self.name, exc)
            else:
                if self._failing:
                    log.info("%s: reading again", self.name)
                self._failing = False
            await asyncio.sleep(self.interval)
