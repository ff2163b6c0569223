"""Affiliates: this node's record on the discovery service, and the cluster's records.

With a ``DiscoveryConfig`` (enabled), the node derives the cluster's discovery keys from
``ClusterConfig.id`` and ``.secret``, publishes its affiliate (host name, machine type,
addresses, Basalt version, etcd peer URL on control planes) and refreshes it every third
of its TTL (less up to a tenth, so that nodes started together spread out), and at once
when its host name or addresses change. It watches the cluster's affiliates and mirrors
them into ``Affiliates`` resources, which the members controller (``get members``) and
etcd's join read. ``DiscoveryStatuses/discovery`` says whether discovery works.

Nothing here stops the node: every failure is retried with backoff, and logged as one
line (with an event) only when discovery goes from working to failing. A record the service
still holds after a failed publish simply runs out at its TTL. On a graceful shutdown
or reset the node deletes its record (best effort, one second); a reboot keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from basalt.machinery.errors import BasaltError
from basalt.machinery.resources import AffiliateSpec, DiscoveryStatusSpec

from ..runtime import Controller, ResourceStore

if TYPE_CHECKING:
    from basalt.machinery.discovery.crypto import ClusterKeys
    from basalt.machinery.discovery.model import Affiliate

    from ..node import Node

log = logging.getLogger(__name__)

OWNER = "discovery"
STATUS_ID = "discovery"
#: The first wait after a failure; it doubles up to :func:`backoff_cap`.
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
#: How long a graceful shutdown waits for the service to delete this node's record.
DELETE_TIMEOUT = 1.0
#: Stages in which the node leaves for good: its record goes with it.
LEAVING: frozenset[str] = frozenset({"shuttingDown", "resetting"})

State = Literal["disabled", "connecting", "connected", "failing"]
#: The two halves of a session; discovery works when both do.
Part = Literal["publish", "watch"]
PARTS: tuple[Part, ...] = ("publish", "watch")


# -- the client, as this controller uses it ------------------------------------------------


class WatchView(Protocol):
    """One event of a watch: the whole decrypted view after the change."""

    @property
    def affiliates(self) -> Mapping[str, Affiliate]: ...


class Client(Protocol):
    """What the controller needs of :class:`basalt.machinery.discovery.client.DiscoveryClient`."""

    async def update(self, affiliate_id: str, affiliate: Affiliate, ttl: float = ...) -> None: ...

    async def delete(self, affiliate_id: str) -> None: ...

    def watch(self) -> AsyncIterator[WatchView]: ...

    async def close(self) -> None: ...


#: (url, keys, PEM CA or '') -> a client.
Connect = Callable[[str, "ClusterKeys", str], Client]


def connect_service(url: str, keys: ClusterKeys, ca: str) -> Client:
    """The real client (imported only on nodes that use discovery)."""
    from basalt.machinery.discovery.client import DiscoveryClient

    return DiscoveryClient(url, keys, ca_pem=ca or None)


# -- pure parts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What a session depends on: a change of any of these starts a new one."""

    url: str
    ca: str
    ttl: float
    cluster_id: str
    secret: str = field(repr=False)
    affiliate_id: str


def affiliate_id_of(cluster_id: str, machine_uuid: str) -> str:
    """Stable per machine and cluster; says nothing of the machine to the service (which
    sees affiliate ids in clear)."""
    import hashlib  # with a discovery config: not the start-up's

    digest = hashlib.sha256(f"basalt-affiliate\0{cluster_id}\0{machine_uuid}".encode())
    return digest.hexdigest()[:32]


def refresh_delay(ttl: float, rand: Callable[[], float] | None = None) -> float:
    """A third of the TTL, less up to a tenth of that (jitter; ``rand``: random.random)."""
    if rand is None:
        import random  # with a discovery config: not the start-up's

        rand = random.random
    third = ttl / 3
    return third - third * 0.1 * rand()


def backoff_cap(ttl: float) -> float:
    """Retry at least every third of the TTL (so a record never lapses for long), and at
    least every BACKOFF_MAX seconds."""
    return max(BACKOFF_START, min(BACKOFF_MAX, ttl / 3))


def next_backoff(current: float, ttl: float) -> float:
    return min(current * 2, backoff_cap(ttl))


def affiliate_specs(view: Mapping[str, Affiliate]) -> dict[str, AffiliateSpec]:
    """The Affiliates resources for a watch's view (affiliate id -> spec)."""
    return {
        affiliate_id: AffiliateSpec(
            node_id=a.node_id,
            hostname=a.hostname,
            machine_type=a.machine_type,
            addresses=list(a.addresses),
            version=a.version,
            etcd_peer_url=a.etcd_peer_url,
        )
        for affiliate_id, a in view.items()
    }


def describe(exc: BaseException) -> str:
    """One line for a log or a status: a refusal's message and hint, else type and text."""
    if isinstance(exc, BasaltError):
        return exc.one_line()
    details = getattr(exc, "details", None)
    if callable(details):  # grpc.aio.AioRpcError
        code = getattr(exc, "code", lambda: "")()
        return f"{getattr(code, 'name', code)}: {details()}"
    return f"{type(exc).__name__}: {exc}"


# -- the I/O around them ------------------------------------------------------------------------


class Session:
    """One service, one cluster: a publisher and a watcher sharing a client."""

    def __init__(
        self,
        node: Node,
        settings: Settings,
        affiliate: Affiliate,
        connect: Connect,
        report: Callable[[Part, str], None],
    ) -> None:
        from basalt.machinery.discovery.crypto import ClusterKeys

        self.node = node
        self.settings = settings
        self.affiliate = affiliate
        self.report = report
        keys = ClusterKeys.from_config(settings.cluster_id, settings.secret)
        self.client = connect(settings.url, keys, settings.ca)
        self.changed = asyncio.Event()
        self.last_published = 0.0
        #: The cluster's affiliates as the last watch event gave them (None: none yet).
        self.view: dict[str, AffiliateSpec] | None = None
        #: Per part: '' when its last attempt worked, else why it failed (absent: none yet).
        self.health: dict[Part, str] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = self.node.background(self._run(), name="discovery")

    def publish(self, affiliate: Affiliate) -> None:
        """Publish ``affiliate`` now if it differs from the last one."""
        if affiliate != self.affiliate:
            self.affiliate = affiliate
            self.changed.set()

    async def stop(self, *, delete: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if delete:
            await self._delete()
        with contextlib.suppress(Exception):
            await self.client.close()

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._publish_forever())
                group.create_task(self._watch_forever())
        finally:
            if self.node.stage in LEAVING:
                await self._delete()
                with contextlib.suppress(Exception):
                    await self.client.close()

    async def _delete(self) -> None:
        try:
            await asyncio.wait_for(self.client.delete(self.settings.affiliate_id), DELETE_TIMEOUT)
        except Exception as exc:
            log.info("discovery: could not delete this node's record: %s", describe(exc))

    async def _publish_forever(self) -> None:
        ttl = self.settings.ttl
        wait = BACKOFF_START
        while True:
            self.changed.clear()
            try:
                await self.client.update(self.settings.affiliate_id, self.affiliate, ttl)
            except Exception as exc:
                self.report("publish", f"publish: {describe(exc)}")
                delay, wait = wait, next_backoff(wait, ttl)
            else:
                self.last_published = time.time()
                self.report("publish", "")
                delay, wait = refresh_delay(ttl), BACKOFF_START
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), delay)

    async def _watch_forever(self) -> None:
        ttl = self.settings.ttl
        wait = BACKOFF_START
        failed = False
        while True:
            try:
                async for event in self.client.watch():
                    self.view = affiliate_specs(event.affiliates)
                    self.report("watch", "")
                    if failed:
                        # The service may have lost records while it was away (or this
                        # node's record expired): publish again now, not at the refresh.
                        self.changed.set()
                        failed = False
                    wait = BACKOFF_START
            except Exception as exc:
                self.report("watch", f"watch: {describe(exc)}")
            failed = True
            await asyncio.sleep(wait)
            wait = next_backoff(wait, ttl)


class DiscoveryController(Controller):
    """DiscoveryConfig -> this node's record on the service; the service's -> Affiliates."""

    name = "discovery"
    inputs = ("MachineConfigs", "NodeAddresses", "Hostnames")
    outputs = ("Affiliates", "DiscoveryStatuses")

    def __init__(self, node: Node, connect: Connect = connect_service) -> None:
        self.node = node
        self.connect = connect
        self.session: Session | None = None
        self.state: State = "disabled"
        self.error = ""
        self._store: ResourceStore | None = None
        self._machine_uuid: str | None = None
        self._mirrored: dict[str, AffiliateSpec] | None = None

    async def reconcile(self, store: ResourceStore) -> None:
        self._store = store
        planned = self._plan(store)
        if planned == "no address":
            # Not yet (metal before its first lease), or briefly none: a running session
            # keeps its record and view rather than leaving the cluster for it.
            if self.session is None:
                self.state = "connecting"
                self._put_status(store)
            return
        if planned is None:
            if self.session is not None:
                session, self.session = self.session, None
                await session.stop(delete=True)
            self._mirror(store, {})
            self.state, self.error = "disabled", ""
            self._put_status(store)
            return
        settings, affiliate = planned
        if self.session is not None and self.session.settings != settings:
            session, self.session = self.session, None
            await session.stop(delete=session.settings.url != settings.url)
        if self.session is None:
            self.state, self.error = "connecting", ""
            self.session = Session(self.node, settings, affiliate, self.connect, self._report)
            self.session.start()
            self._put_status(store)
        else:
            self.session.publish(affiliate)

    # -- what to publish -----------------------------------------------------------------------
    def _plan(
        self, store: ResourceStore
    ) -> tuple[Settings, Affiliate] | Literal["no address"] | None:
        """The session settings and this node's affiliate; None: discovery is off."""
        config = self.node.config
        if config is None:
            return None  # and, on a first boot, no config models imported before the API
        from basalt.machinery.config import ClusterConfig, DiscoveryConfig
        from basalt.machinery.discovery.model import Affiliate

        from ..etcd.client import peer_url

        discovery = config.first(DiscoveryConfig)
        cluster = config.first(ClusterConfig)
        machine = self.node.machine
        if discovery is None or not discovery.enabled or cluster is None or machine is None:
            return None
        addresses = self._addresses(store)
        if not addresses:
            return "no address"
        if self._machine_uuid is None:
            self._machine_uuid = self.node.platform.machine_uuid()
        settings = Settings(
            url=discovery.url,
            ca=discovery.ca,
            ttl=discovery.ttl_seconds(),
            cluster_id=cluster.id,
            secret=cluster.secret,
            affiliate_id=affiliate_id_of(cluster.id, self._machine_uuid),
        )
        controlplane = machine.type == "controlplane"
        affiliate = Affiliate(
            node_id=self._machine_uuid,
            hostname=self.node.hostname,
            machine_type=machine.type,
            addresses=tuple(addresses),
            version=self.node.version,
            etcd_peer_url=peer_url(self._etcd_address(addresses)) if controlplane else "",
        )
        return settings, affiliate

    def _addresses(self, store: ResourceStore) -> list[str]:
        current = store.get("NodeAddresses", "current")
        found = [str(a) for a in getattr(current.spec, "addresses", [])] if current else []
        if self.node.platform.address_known and self.node.address not in found:
            found.insert(0, self.node.address)
        return found

    def _etcd_address(self, addresses: list[str]) -> str:
        """etcd listens on the node's address (EtcdManager.peer_url)."""
        return self.node.address if self.node.platform.address_known else addresses[0]

    # -- what the service says --------------------------------------------------------------
    def _report(self, part: Part, error: str) -> None:
        """A session's news (``error`` '' : that part works): mirror its view, and say when
        discovery starts or stops working (one log line and one event per change)."""
        store = self._store
        session = self.session
        if store is None or session is None:
            return
        session.health[part] = error
        if part == "watch" and not error and session.view is not None:
            self._mirror(store, session.view)
        failing = [text for text in session.health.values() if text]
        url = session.settings.url
        if failing:
            if self.state != "failing":
                log.warning("discovery: %s failing: %s", url, failing[0])
                self.node.events.publish(
                    "discovery", f"discovery through {url} failing: {failing[0]}", actor=OWNER
                )
            self.state, self.error = "failing", failing[0]
        elif len(session.health) == len(PARTS):
            if self.state == "failing":
                log.info("discovery: %s works again", url)
                self.node.events.publish(
                    "discovery", f"discovery through {url} works again", actor=OWNER
                )
            self.state, self.error = "connected", ""
        self._put_status(store)

    def _mirror(self, store: ResourceStore, view: Mapping[str, AffiliateSpec]) -> None:
        if self._mirrored == view:
            return
        for affiliate_id, spec in view.items():
            store.put("Affiliates", affiliate_id, spec, owner=OWNER)
        store.retain("Affiliates", set(view), owner=OWNER)
        self._mirrored = dict(view)

    def _put_status(self, store: ResourceStore) -> None:
        session = self.session
        store.put(
            "DiscoveryStatuses",
            STATUS_ID,
            DiscoveryStatusSpec(
                state=self.state,
                url=session.settings.url if session else "",
                affiliate_id=session.settings.affiliate_id if session else "",
                affiliates=len(self._mirrored or {}),
                last_published=session.last_published if session else 0.0,
                last_error=self.error,
            ),
            owner=OWNER,
        )
