"""NodeAddresses/current on metal: links, addresses and routes from LinkConfig, and DHCPv4.

Each LinkConfig brings its link up or down, sets its MTU, and adds its static
addresses and routes (through netlink, replacing, so a second run changes nothing).
What an earlier config added and the current one no longer has is removed; nothing
else on the machine is touched. Links with ``dhcp: true`` get a DHCPv4 client; with no
LinkConfig at all, the first Ethernet link does (what QEMU's user network and most
clouds expect). NodeAddresses lists the global addresses really present on the links
afterwards, read back from the kernel: configured ones first, then DHCP's, then any
other.

In container mode the host owns the network: this controller does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from basalt.machinery.errors import BasaltError
from basalt.machinery.resources import NodeAddressesSpec

from ..runtime import Controller, ResourceStore
from ..sys import netlink
from ..sys.dhcp import DhcpClient, DhcpTiming, Lease

if TYPE_CHECKING:
    from basalt.machinery.config.network import LinkConfig

    from ..node import Node

log = logging.getLogger(__name__)

#: Routes learnt by DHCP; a static default route (metric 1024 too) replaces it.
DHCP_METRIC = 1024
_WAIT_LOG_INTERVAL = 10.0
#: The longest the network waits for the maintenance API to open before using netlink.
_API_FIRST_TIMEOUT = 30.0


class NetworkConfigError(BasaltError):
    """Some LinkConfig could not be applied; the message names each link and the reason."""


@dataclass
class _Applied:
    """What this controller put on one link, to take away when config drops it."""

    index: int
    addresses: set[str] = field(default_factory=set)
    routes: set[tuple[str, str, int]] = field(default_factory=set)


class DhcpLeases:
    """The leases the node's DHCP clients hold, by link; others may listen for changes."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._listeners: list[Callable[[], None]] = []

    def set(self, link: str, lease: Lease | None) -> None:
        if lease is None:
            self._leases.pop(link, None)
        else:
            self._leases[link] = lease
        for listener in self._listeners:
            listener()

    def items(self) -> list[tuple[str, Lease]]:
        return sorted(self._leases.items())

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)


def _is_ethernet(link: netlink.Link) -> bool:
    return not link.loopback and len(link.mac) == 17 and link.mac != "00:00:00:00:00:00"


def default_dhcp_link(links: list[netlink.Link]) -> netlink.Link | None:
    """The link DHCP runs on when no LinkConfig exists: the first physical Ethernet link
    (by index), else the first Ethernet link of any kind (veth, bridge, ...)."""
    ethernet = [link for link in links if _is_ethernet(link)]
    physical = [link for link in ethernet if link.kind is None]
    candidates = physical or ethernet
    return candidates[0] if candidates else None


def order_addresses(
    present: list[netlink.Address], static: list[str], dynamic: list[str]
) -> list[str]:
    """Global addresses as published: configured first, then DHCP's, then the rest."""
    ips = [a.ip for a in present if a.global_scope]
    ordered = [ip for ip in [*static, *dynamic] if ip in ips]
    rest = [ip for ip in ips if ip not in ordered]
    return list(dict.fromkeys([*ordered, *rest]))


class NetworkController(Controller):
    name = "network"
    inputs = ("MachineConfigs",)
    outputs = ("NodeAddresses",)

    def __init__(self, node: Node, *, dhcp_timing: DhcpTiming | None = None) -> None:
        self.node = node
        self.dhcp_timing = dhcp_timing
        self.leases = DhcpLeases()
        #: The config bundle the last reconcile applied (None before the first).
        self.applied_config: object = None
        self.published = asyncio.Event()
        self._applied: dict[str, _Applied] = {}
        self._clients: dict[str, asyncio.Task[None]] = {}
        self._static_order: list[str] = []
        self._first_run = True

    # -- reconcile ----------------------------------------------------------------------------
    async def reconcile(self, store: ResourceStore) -> None:
        if not self.node.platform.mode.manages_network:
            return
        config = self.node.config
        wanted = self._link_configs()
        if self._first_run:
            self._first_run = False
            if not wanted and not self.node.api_first.is_set():
                self._start_dhcp_early()
        await self._netlink_allowed()
        links = {link.name: link for link in await netlink.links()}
        for link in links.values():
            if link.loopback and not link.up:
                await netlink.set_link(link.index, up=True)
        errors = []
        for link_config in wanted:
            try:
                await self._apply_link(link_config, links)
            except (BasaltError, ValueError) as exc:
                errors.append(f"LinkConfig({link_config.name}): {exc}")
        for name in set(self._applied) - {c.name for c in wanted}:
            await self._forget(name, self._applied.pop(name))
        await self._run_dhcp(self._dhcp_links(wanted, links), links)
        self._static_order = [
            str(ipaddress.ip_interface(a).ip) for c in wanted for a in c.addresses
        ]
        await self.publish(store)
        self.applied_config = config
        if errors:
            raise NetworkConfigError("; ".join(errors))

    async def _apply_link(self, wanted: LinkConfig, links: dict[str, netlink.Link]) -> None:
        link = links.get(wanted.name)
        if link is None:
            known = ", ".join(sorted(links)) or "none"
            raise NetworkConfigError(f"no link named {wanted.name} (links: {known})")
        mtu = wanted.mtu if wanted.mtu is not None and wanted.mtu != link.mtu else None
        if mtu is not None or wanted.up != link.up:
            await netlink.set_link(link.index, up=wanted.up, mtu=mtu)
        applied = self._applied.setdefault(wanted.name, _Applied(link.index))
        # Removals first: deleting a primary IPv4 address takes the secondary addresses
        # of its subnet with it (unless promote_secondaries), new ones included.
        routes = {(r.network, r.gateway, r.metric) for r in wanted.routes}
        for network, gateway, metric in applied.routes - routes:
            await netlink.delete_route(network, gateway, link.index, metric=metric)
        addresses = set(wanted.addresses)
        for address in applied.addresses - addresses:
            await netlink.delete_address(link.index, address)
        applied.addresses = addresses
        for address in wanted.addresses:
            await netlink.add_address(link.index, address)
        applied.routes = routes
        for network, gateway, metric in sorted(routes):
            await netlink.replace_route(network, gateway, link.index, metric=metric)

    async def _forget(self, name: str, applied: _Applied) -> None:
        """Remove what an earlier config put on link ``name``."""
        with contextlib.suppress(BasaltError):
            for network, gateway, metric in applied.routes:
                await netlink.delete_route(network, gateway, applied.index, metric=metric)
            for address in applied.addresses:
                await netlink.delete_address(applied.index, address)

    # -- the first boot: DHCP while the API opens ---------------------------------------------
    def _start_dhcp_early(self) -> None:
        """Start DHCP on the default link from sysfs and an ioctl, without pyroute2.

        Importing pyroute2 takes seconds under TCG, and a thread importing it competes
        for the GIL with the maintenance API's start. So at boot the DHCP exchange (small
        and mostly waiting) starts at once, and netlink waits until the API listens
        (:meth:`_netlink_allowed`); the first reconcile then keeps this client when
        netlink picks the same link, and replaces it otherwise.
        """
        from ..sys import ifaces

        root = self.node.platform.system_root
        link = default_dhcp_link(ifaces.sysfs_links(root / "sys" / "class" / "net"))
        if link is None:
            return
        try:
            if not link.up:
                ifaces.set_up(link.name)
        except BasaltError as exc:
            log.info("%s: DHCPv4 waits for netlink: %s", link.name, exc)
            return
        self._start_client(link)

    async def _netlink_allowed(self) -> None:
        """Wait while the boot's maintenance API is still opening (at most a while)."""
        gate = self.node.api_first
        if not gate.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gate.wait(), _API_FIRST_TIMEOUT)

    # -- DHCP ---------------------------------------------------------------------------------
    def _dhcp_links(self, wanted: list[LinkConfig], links: dict[str, netlink.Link]) -> set[str]:
        if wanted:
            return {c.name for c in wanted if c.dhcp and c.name in links}
        fallback = default_dhcp_link(list(links.values()))
        return {fallback.name} if fallback is not None else set()

    async def _run_dhcp(self, names: set[str], links: dict[str, netlink.Link]) -> None:
        for name in set(self._clients) - names:
            task = self._clients.pop(name)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            lease = dict(self.leases.items()).get(name)
            if lease is not None:
                await self._lease_lost(name, links[name].index if name in links else 0, lease)
        for name in sorted(names - set(self._clients)):
            link = links[name]
            if not link.up:
                await netlink.set_link(link.index, up=True)
            self._start_client(link)

    def _start_client(self, link: netlink.Link) -> None:
        hostname, timing = self.node.hostname, self.dhcp_timing
        client = DhcpClient(link.name, link.mac, hostname=hostname, timing=timing)
        self._clients[link.name] = self.node.background(
            self._keep_lease(client, link.index), name=f"dhcp:{link.name}"
        )
        log.info("%s: DHCPv4 started", link.name)

    async def _keep_lease(self, client: DhcpClient, index: int) -> None:
        name = client.ifname

        async def bound(lease: Lease) -> None:
            await self._lease_bound(name, index, lease)

        async def lost(lease: Lease) -> None:
            await self._lease_lost(name, index, lease)

        await client.run(bound, lost)

    async def _lease_bound(self, name: str, index: int, lease: Lease) -> None:
        previous = dict(self.leases.items()).get(name)
        if (
            previous is not None
            or self.node.api_first.is_set()
            or not await self._apply_early(name, index, lease)
        ):
            await self._apply_lease(name, index, lease, previous)
        if previous is None or previous.address != lease.address:
            log.info("%s: DHCP address %s applied", name, lease.address)
            self.node.events.publish(
                "network",
                f"{name}: DHCP lease {lease.address} from {lease.server}",
                actor=self.name,
                link=name,
                address=str(lease.address),
            )
        self.leases.set(name, lease)
        self._kick()

    async def _apply_early(self, name: str, index: int, lease: Lease) -> bool:
        """The first lease while the maintenance API opens: its address, routes and MTU
        through rtnetlink and ioctls directly, without waiting for pyroute2. False when
        the kernel refused (the netlink path then tries, once the API listens)."""
        from ..sys import ifaces

        configured = any(c.name == name and c.mtu is not None for c in self._link_configs())

        def apply() -> None:
            valid = max(1, int(lease.remaining(time.monotonic())))
            ifaces.replace_address(index, str(lease.address), valid)
            if lease.mtu is not None and not configured:
                ifaces.set_mtu(name, lease.mtu)
            for network, gateway in lease.routes():
                via = None if gateway == ipaddress.IPv4Address(0) else str(gateway)
                ifaces.replace_route(
                    str(network), via, index, metric=DHCP_METRIC, protocol=netlink.PROTO_DHCP
                )

        try:
            await asyncio.to_thread(apply)
        except BasaltError as exc:
            log.warning("%s: DHCP lease not applied before netlink: %s", name, exc)
            return False
        return True

    async def _apply_lease(
        self, name: str, index: int, lease: Lease, previous: Lease | None
    ) -> None:
        await self._netlink_allowed()
        if previous is not None and previous.address != lease.address:
            await self._lease_lost(name, index, previous)
        await netlink.add_address(
            index, str(lease.address), valid_lft=lease.remaining(time.monotonic())
        )
        configured = next(
            (c for c in self._link_configs() if c.name == name and c.mtu is not None), None
        )
        if lease.mtu is not None and configured is None:
            await netlink.set_link(index, mtu=lease.mtu)
        for network, gateway in lease.routes():
            via = None if gateway == ipaddress.IPv4Address(0) else str(gateway)
            await netlink.replace_route(
                str(network), via, index, metric=DHCP_METRIC, protocol=netlink.PROTO_DHCP
            )

    async def _lease_lost(self, name: str, index: int, lease: Lease) -> None:
        with contextlib.suppress(BasaltError):
            for network, gateway in lease.routes():
                via = None if gateway == ipaddress.IPv4Address(0) else str(gateway)
                await netlink.delete_route(
                    str(network), via, index, metric=DHCP_METRIC, protocol=netlink.PROTO_DHCP
                )
            await netlink.delete_address(index, str(lease.address))
        self.node.events.publish(
            "network", f"{name}: DHCP lease {lease.address} lost", actor=self.name, link=name
        )
        self.leases.set(name, None)
        self._kick()

    def _link_configs(self) -> list[LinkConfig]:
        config = self.node.config
        if config is None:  # maintenance: the config models are not even imported
            return []
        from basalt.machinery.config.network import LinkConfig

        return config.all(LinkConfig)

    def _kick(self) -> None:
        if self.node.engine is not None:
            self.node.engine.kick(self.name)

    # -- addresses ----------------------------------------------------------------------------
    async def publish(self, store: ResourceStore) -> list[str]:
        links = {link.index: link for link in await netlink.links()}
        present = [a for a in await netlink.addresses() if not links[a.index].loopback]
        dynamic = [str(lease.address.ip) for _, lease in self.leases.items()]
        addresses = order_addresses(present, self._static_order, dynamic)
        spec = NodeAddressesSpec(addresses=addresses)
        store.put("NodeAddresses", "current", spec, owner=self.name)
        self.published.set()
        return addresses


def _network_controller(node: Node) -> NetworkController:
    engine = node.engine
    found = [c for c in (engine.controllers if engine else []) if isinstance(c, NetworkController)]
    if not found:
        raise NetworkConfigError("the network controller is not running")
    return found[0]


async def wait_for_address(node: Node) -> str:
    """The node's first address once the network has applied the running config.

    For metal nodes started without ``--address``: certificates, etcd and kubelet need
    the address the node will be reached on, and it is known only once links are up
    and DHCP (if any) has a lease.
    """
    controller = _network_controller(node)
    waited_since = time.monotonic()
    logged = 0.0
    announced = False
    while True:
        controller.published.clear()
        current = node.store.get("NodeAddresses", "current")
        if controller.applied_config is node.config and current is not None:
            addresses = getattr(current.spec, "addresses", [])
            if addresses:
                return str(addresses[0])
        waited = time.monotonic() - waited_since
        if waited - logged >= _WAIT_LOG_INTERVAL:
            logged = waited
            log.info("waiting for a network address (%.0f s so far)", waited)
            if not announced:
                announced = True
                node.events.publish(
                    "network", "waiting for a network address", actor=NetworkController.name
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(controller.published.wait(), 1.0)
