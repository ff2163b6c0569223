"""What the service holds: per cluster (by wire id), its affiliates' sealed records with
their expiry, and its watches.

No I/O and no clock of its own: every operation takes ``now`` (Unix seconds), so the
tests drive time by hand. Records are ciphertext; the registry never looks into them,
and compares endpoints only as bytes (AES-SIV makes equal addresses equal bytes).
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from .limits import LimitReached, Limits, TooLarge

ChangeKind = Literal["update", "delete", "expired"]


@dataclass(frozen=True)
class Record:
    """One affiliate's sealed record."""

    data: bytes
    endpoints: tuple[bytes, ...]
    expires: float

    @property
    def size(self) -> int:
        return len(self.data) + sum(len(e) for e in self.endpoints)


@dataclass(frozen=True)
class Change:
    """One change to a cluster, as its watches receive it (``record`` None: removed)."""

    kind: ChangeKind
    affiliate_id: str
    record: Record | None = None
    #: When the registry made the change (the fan-out latency starts there).
    at: float = 0.0


class Watch:
    """One open watch: the changes queued for it, at most ``Limits.watch_queue``. A watch
    that falls that far behind is dropped (``dropped`` says why) instead of slowing the
    others or holding memory; its client watches again and gets a fresh snapshot."""

    __slots__ = ("cluster_id", "dropped", "queue")

    def __init__(self, cluster_id: str, size: int) -> None:
        self.cluster_id = cluster_id
        # One slot more than the limit: room for the wake-up that follows a drop.
        self.queue: asyncio.Queue[Change | None] = asyncio.Queue(size + 1)
        self.dropped = ""

    def offer(self, change: Change, size: int) -> bool:
        """Queue ``change``; False (and the watch dropped) when ``size`` are waiting."""
        if self.dropped:
            return False
        if self.queue.qsize() >= size:
            self.dropped = f"the watch fell {size} changes behind (limit watch_queue={size})"
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            return False
        self.queue.put_nowait(change)
        return True


@dataclass
class Cluster:
    affiliates: dict[str, Record] = field(default_factory=dict)
    watches: set[Watch] = field(default_factory=set)


class Registry:
    """Every cluster's affiliates and watches (see the module docstring)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.clusters: dict[str, Cluster] = {}
        # (expires, cluster id, affiliate id); stale entries are skipped when popped.
        self._expiry: list[tuple[float, str, str]] = []
        #: Watches dropped as too slow since the start (for metrics).
        self.dropped_watches = 0
        #: Bumped on every change (the snapshot writer skips a write when it has not moved).
        self.generation = 0
        #: Bytes of every record held (Limits.total_size).
        self.size = 0

    # -- counts ----------------------------------------------------------------------------
    @property
    def affiliate_count(self) -> int:
        return sum(len(c.affiliates) for c in self.clusters.values())

    @property
    def watch_count(self) -> int:
        return sum(len(c.watches) for c in self.clusters.values())

    # -- changes ---------------------------------------------------------------------------
    def update(
        self,
        cluster_id: str,
        affiliate_id: str,
        data: bytes,
        endpoints: Iterable[bytes],
        ttl: int,
        now: float,
    ) -> Record:
        """Create or replace a record; LimitError/RequestError naming the limit."""
        limits = self.limits
        if len(data) > limits.data_size:
            raise TooLarge("data_size", limits.data_size, f"the data is {len(data)} bytes")
        unique = tuple(sorted(set(endpoints)))
        for endpoint in unique:
            if len(endpoint) > limits.endpoint_size:
                raise TooLarge(
                    "endpoint_size", limits.endpoint_size, f"an endpoint is {len(endpoint)} bytes"
                )
        if len(unique) > limits.endpoints_per_affiliate:
            raise TooLarge(
                "endpoints_per_affiliate",
                limits.endpoints_per_affiliate,
                f"the affiliate has {len(unique)} distinct endpoints",
            )
        ttl = ttl or limits.ttl_default
        if ttl > limits.ttl_max:
            raise TooLarge("ttl_max", limits.ttl_max, f"the time to live is {ttl} seconds")
        cluster = self.clusters.get(cluster_id)
        if cluster is None:
            cluster = self._new_cluster(cluster_id)
        elif (
            affiliate_id not in cluster.affiliates
            and len(cluster.affiliates) >= limits.affiliates_per_cluster
        ):
            raise LimitReached(
                "affiliates_per_cluster",
                limits.affiliates_per_cluster,
                f"cluster {cluster_id[:12]} has {len(cluster.affiliates)} affiliates",
            )
        record = Record(data, unique, now + ttl)
        previous = cluster.affiliates.get(affiliate_id)
        size = self.size + record.size - (previous.size if previous else 0)
        if size > limits.total_size:
            self._forget_if_empty(cluster_id, cluster)
            raise LimitReached(
                "total_size", limits.total_size, "the service holds as many bytes as it may"
            )
        self.size = size
        cluster.affiliates[affiliate_id] = record
        heapq.heappush(self._expiry, (record.expires, cluster_id, affiliate_id))
        self._publish(cluster_id, cluster, Change("update", affiliate_id, record, now))
        return record

    def delete(self, cluster_id: str, affiliate_id: str, now: float) -> bool:
        """Remove a record; False when there was none (not an error: deletes repeat)."""
        cluster = self.clusters.get(cluster_id)
        record = cluster.affiliates.pop(affiliate_id, None) if cluster else None
        if cluster is None or record is None:
            return False
        self.size -= record.size
        self._publish(cluster_id, cluster, Change("delete", affiliate_id, None, now))
        self._forget_if_empty(cluster_id, cluster)
        return True

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Remove every record whose time ran out; the (cluster, affiliate) removed."""
        removed: list[tuple[str, str]] = []
        while self._expiry and self._expiry[0][0] <= now:
            expires, cluster_id, affiliate_id = heapq.heappop(self._expiry)
            cluster = self.clusters.get(cluster_id)
            record = cluster.affiliates.get(affiliate_id) if cluster else None
            if cluster is None or record is None or record.expires != expires:
                continue  # replaced or deleted since this entry was pushed
            del cluster.affiliates[affiliate_id]
            self.size -= record.size
            removed.append((cluster_id, affiliate_id))
            self._publish(cluster_id, cluster, Change("expired", affiliate_id, None, now))
            self._forget_if_empty(cluster_id, cluster)
        if len(self._expiry) > 4096 and len(self._expiry) > 2 * self.affiliate_count + 1024:
            self._rebuild_expiry()
        return removed

    def _rebuild_expiry(self) -> None:
        self._expiry = [
            (record.expires, cluster_id, affiliate_id)
            for cluster_id, cluster in self.clusters.items()
            for affiliate_id, record in cluster.affiliates.items()
        ]
        heapq.heapify(self._expiry)

    def _new_cluster(self, cluster_id: str) -> Cluster:
        if len(self.clusters) >= self.limits.clusters:
            raise LimitReached(
                "clusters", self.limits.clusters, "the service holds no more clusters"
            )
        cluster = self.clusters[cluster_id] = Cluster()
        return cluster

    def _forget_if_empty(self, cluster_id: str, cluster: Cluster) -> None:
        if not cluster.affiliates and not cluster.watches:
            self.clusters.pop(cluster_id, None)

    def _publish(self, cluster_id: str, cluster: Cluster, change: Change) -> None:
        self.generation += 1
        size = self.limits.watch_queue
        for watch in list(cluster.watches):
            if not watch.offer(change, size):
                cluster.watches.discard(watch)
                self.dropped_watches += 1
        self._forget_if_empty(cluster_id, cluster)

    # -- reads and watches -----------------------------------------------------------------
    def affiliates(self, cluster_id: str) -> dict[str, Record]:
        """A copy of the cluster's live records (empty for a cluster never seen)."""
        cluster = self.clusters.get(cluster_id)
        return dict(cluster.affiliates) if cluster else {}

    def watch(self, cluster_id: str) -> tuple[Watch, dict[str, Record]]:
        """Open a watch and take the snapshot it starts from, at the same instant."""
        cluster = self.clusters.get(cluster_id)
        if cluster is None:
            cluster = self._new_cluster(cluster_id)
        elif len(cluster.watches) >= self.limits.watches_per_cluster:
            raise LimitReached(
                "watches_per_cluster",
                self.limits.watches_per_cluster,
                f"cluster {cluster_id[:12]} has {len(cluster.watches)} open watches",
            )
        watch = Watch(cluster_id, self.limits.watch_queue)
        cluster.watches.add(watch)
        return watch, dict(cluster.affiliates)

    def unwatch(self, watch: Watch) -> None:
        cluster = self.clusters.get(watch.cluster_id)
        if cluster is not None:
            cluster.watches.discard(watch)
            self._forget_if_empty(watch.cluster_id, cluster)

    # -- snapshots -------------------------------------------------------------------------
    def records(self) -> Iterator[tuple[str, str, Record]]:
        for cluster_id, cluster in self.clusters.items():
            for affiliate_id, record in cluster.affiliates.items():
                yield cluster_id, affiliate_id, record

    def restore(self, cluster_id: str, affiliate_id: str, record: Record, now: float) -> bool:
        """Put back a record from a snapshot (no limits, no watches); False if expired."""
        if record.expires <= now:
            return False
        cluster = self.clusters.setdefault(cluster_id, Cluster())
        previous = cluster.affiliates.get(affiliate_id)
        self.size += record.size - (previous.size if previous else 0)
        cluster.affiliates[affiliate_id] = record
        heapq.heappush(self._expiry, (record.expires, cluster_id, affiliate_id))
        return True
