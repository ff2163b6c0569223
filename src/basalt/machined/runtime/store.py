"""A versioned, watchable, in-memory resource store.

Every write bumps the resource's version only when its spec really changed, so
watchers and controllers see no churn. Each resource has one owner (the controller
that writes it); a write by anyone else is refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Literal

from basalt.machinery.errors import BasaltError
from basalt.machinery.resources import DEFINITIONS, ResourceDefinition, Spec

EventKind = Literal["created", "updated", "destroyed", "bootstrapped"]
WATCH_QUEUE = 1024


class OwnershipError(BasaltError):
    """A controller tried to write a resource that another controller owns."""


@dataclass(frozen=True)
class ResourceMeta:
    namespace: str
    type: str
    id: str
    version: int
    created: float
    updated: float
    owner: str
    phase: str = "running"


@dataclass(frozen=True)
class Resource:
    meta: ResourceMeta
    spec: Spec

    def spec_json(self) -> str:
        return self.spec.to_json()


@dataclass(frozen=True)
class WatchEvent:
    kind: EventKind
    resource: Resource | None


class ResourceStore:
    """Resources by (type, id); types come from the shared definitions table."""

    def __init__(self, definitions: tuple[ResourceDefinition, ...] = DEFINITIONS) -> None:
        self._definitions = {d.type: d for d in definitions}
        self._items: dict[str, dict[str, Resource]] = {d.type: {} for d in definitions}
        self._watchers: dict[str, set[asyncio.Queue[WatchEvent]]] = {}
        self._listeners: dict[str, list[Callable[[], None]]] = {}

    def definition(self, type_: str) -> ResourceDefinition:
        return self._definitions[type_]

    def get(self, type_: str, id_: str) -> Resource | None:
        return self._items[type_].get(id_)

    def list(self, type_: str) -> list[Resource]:
        return [self._items[type_][k] for k in sorted(self._items[type_])]

    def put(self, type_: str, id_: str, spec: Spec, *, owner: str) -> Resource:
        """Create or update; returns the stored resource (unchanged when the spec is equal)."""
        items = self._items[type_]
        now = time.time()
        current = items.get(id_)
        if current is not None:
            if current.meta.owner != owner:
                raise OwnershipError(f"{type_}/{id_} is owned by {current.meta.owner}, not {owner}")
            if current.spec == spec:
                return current
            meta = replace(current.meta, version=current.meta.version + 1, updated=now)
            kind: EventKind = "updated"
        else:
            definition = self._definitions[type_]
            meta = ResourceMeta(definition.namespace, type_, id_, 1, now, now, owner)
            kind = "created"
        resource = Resource(meta, spec)
        items[id_] = resource
        self._notify(type_, WatchEvent(kind, resource))
        return resource

    def delete(self, type_: str, id_: str, *, owner: str) -> None:
        current = self._items[type_].get(id_)
        if current is None:
            return
        if current.meta.owner != owner:
            raise OwnershipError(f"{type_}/{id_} is owned by {current.meta.owner}, not {owner}")
        del self._items[type_][id_]
        self._notify(type_, WatchEvent("destroyed", current))

    def retain(self, type_: str, ids: set[str], *, owner: str) -> None:
        """Delete this owner's resources of ``type_`` whose id is not in ``ids``."""
        for resource in self.list(type_):
            if resource.meta.owner == owner and resource.meta.id not in ids:
                self.delete(type_, resource.meta.id, owner=owner)

    # -- change notification ----------------------------------------------------------
    def on_change(self, type_: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously, cheaply) after any change to ``type_``."""
        self._listeners.setdefault(type_, []).append(callback)

    def _notify(self, type_: str, event: WatchEvent) -> None:
        for callback in self._listeners.get(type_, []):
            callback()
        for queue in list(self._watchers.get(type_, ())):
            if queue.qsize() < WATCH_QUEUE:
                queue.put_nowait(event)
            else:
                # A watcher that cannot keep up is ended after the events it has queued
                # (no gap), in the slot kept for that; it can watch again with tail.
                self._watchers[type_].discard(queue)
                queue.put_nowait(WatchEvent("destroyed", None))

    async def watch(
        self, type_: str, id_: str | None = None, *, tail: bool = False
    ) -> AsyncIterator[WatchEvent]:
        """Changes to ``type_`` (optionally one id); with ``tail``, the current state first.

        A watcher that falls more than WATCH_QUEUE events behind is ended with a
        ``destroyed`` event whose resource is None.
        """
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue(WATCH_QUEUE + 1)  # + the end
        self._watchers.setdefault(type_, set()).add(queue)
        try:
            if tail:
                for resource in self.list(type_):
                    if id_ is None or resource.meta.id == id_:
                        yield WatchEvent("created", resource)
                yield WatchEvent("bootstrapped", None)
            while True:
                event = await queue.get()
                if event.resource is None:
                    return
                if id_ is None or event.resource.meta.id == id_:
                    yield event
        finally:
            self._watchers.get(type_, set()).discard(queue)
