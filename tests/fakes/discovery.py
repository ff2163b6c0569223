"""A discovery service in memory, and clients of it, for node-side unit tests.

It behaves like the real one where the node can tell: records are sealed with the real
cluster keys (a client of another cluster sees none of them), each expires at its TTL on
the service's clock (injected: ``advance`` moves it and expires what ran out), a watch
starts with a snapshot and then gives the whole decrypted view after every change, and
a service that goes ``down`` fails every call and ends every watch with a DiscoveryError.
``restart(lose_records=True)`` plays a service that keeps nothing across a restart;
``refuse_updates`` one that refuses this node's writes while its watch works.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from basalt.machinery.discovery.client import WatchEvent, WatchKind
from basalt.machinery.discovery.crypto import ClusterKeys
from basalt.machinery.discovery.errors import DiscoveryError
from basalt.machinery.discovery.model import Affiliate


@dataclass
class Record:
    data: bytes
    expires: float


@dataclass
class Published:
    """One update the service took, opened again (what the test checks)."""

    affiliate_id: str
    affiliate: Affiliate
    ttl: float


_DOWN = object()


@dataclass
class FakeDiscoveryService:
    now: float = 1000.0
    down: bool = False
    #: Raised by every update while set (a refusal: a limit, a bad proof).
    refuse_updates: Exception | None = None
    clusters: dict[str, dict[str, Record]] = field(default_factory=dict)
    published: list[Published] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    _watchers: dict[str, set[asyncio.Queue[object]]] = field(default_factory=dict)

    # -- the test's controls ---------------------------------------------------------------
    def connect(self, url: str, keys: ClusterKeys, ca: str = "") -> FakeDiscoveryClient:
        """Shaped like the controller's ``connect``: a client of this service."""
        return FakeDiscoveryClient(self, keys, url)

    def advance(self, seconds: float) -> None:
        """Move the clock; records that ran out expire (watchers see them go)."""
        self.now += seconds
        for wire_id, records in self.clusters.items():
            for affiliate_id in [a for a, r in records.items() if r.expires <= self.now]:
                del records[affiliate_id]
                self._notify(wire_id, ("delete", affiliate_id))

    def stop(self) -> None:
        self.down = True
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(_DOWN)

    def restart(self, *, lose_records: bool = False) -> None:
        self.stop()
        if lose_records:
            self.clusters.clear()
        self.down = False

    def records(self, keys: ClusterKeys) -> dict[str, Affiliate]:
        """The cluster's live records, opened."""
        return {
            affiliate_id: Affiliate.from_json(keys.open_data(affiliate_id, record.data))
            for affiliate_id, record in self.clusters.get(keys.wire_id, {}).items()
        }

    # -- what clients call -------------------------------------------------------------------
    def check_up(self, target: str) -> None:
        if self.down:
            raise DiscoveryError(
                f"discovery service {target}: UNAVAILABLE: connection refused",
                hint="the service may be down or restarting; the node retries",
            )

    def put(self, keys: ClusterKeys, affiliate_id: str, affiliate: Affiliate, ttl: float) -> None:
        if self.refuse_updates is not None:
            raise self.refuse_updates
        data = keys.seal_data(affiliate_id, affiliate.to_json())
        self.clusters.setdefault(keys.wire_id, {})[affiliate_id] = Record(data, self.now + ttl)
        self.published.append(Published(affiliate_id, affiliate, ttl))
        self._notify(keys.wire_id, ("update", affiliate_id))

    def remove(self, keys: ClusterKeys, affiliate_id: str) -> None:
        self.deleted.append(affiliate_id)
        if self.clusters.get(keys.wire_id, {}).pop(affiliate_id, None) is not None:
            self._notify(keys.wire_id, ("delete", affiliate_id))

    def subscribe(self, wire_id: str) -> asyncio.Queue[object]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._watchers.setdefault(wire_id, set()).add(queue)
        return queue

    def unsubscribe(self, wire_id: str, queue: asyncio.Queue[object]) -> None:
        self._watchers.get(wire_id, set()).discard(queue)

    def _notify(self, wire_id: str, change: tuple[WatchKind, str]) -> None:
        for queue in self._watchers.get(wire_id, set()):
            queue.put_nowait(change)


class FakeDiscoveryClient:
    """The DiscoveryClient API over a :class:`FakeDiscoveryService`."""

    def __init__(self, service: FakeDiscoveryService, keys: ClusterKeys, target: str) -> None:
        self.service = service
        self.keys = keys
        self.target = target
        self.closed = False

    async def update(self, affiliate_id: str, affiliate: Affiliate, ttl: float = 1800.0) -> None:
        await asyncio.sleep(0)
        self.service.check_up(self.target)
        self.service.put(self.keys, affiliate_id, affiliate, ttl)

    async def delete(self, affiliate_id: str) -> None:
        await asyncio.sleep(0)
        self.service.check_up(self.target)
        self.service.remove(self.keys, affiliate_id)

    async def list(self) -> list[tuple[str, Affiliate]]:
        await asyncio.sleep(0)
        self.service.check_up(self.target)
        return sorted(self.service.records(self.keys).items())

    async def watch(self) -> AsyncIterator[WatchEvent]:
        self.service.check_up(self.target)
        queue = self.service.subscribe(self.keys.wire_id)
        try:
            yield WatchEvent("snapshot", self.service.records(self.keys))
            while True:
                change = await queue.get()
                if change is _DOWN:
                    raise DiscoveryError(
                        f"discovery service {self.target}: UNAVAILABLE: the stream broke"
                    )
                assert isinstance(change, tuple)
                kind, affiliate_id = change
                yield WatchEvent(kind, self.service.records(self.keys), affiliate_id)
        finally:
            self.service.unsubscribe(self.keys.wire_id, queue)

    async def close(self) -> None:
        self.closed = True
