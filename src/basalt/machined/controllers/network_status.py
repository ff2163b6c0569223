"""Links, Addresses and Routes: what the kernel's network stack holds, read through
rtnetlink (pyroute2) every few seconds. Read-only: the network controller (metal) is the
one that changes links.

Process nodes share the host's network namespace, so there these are the host's links,
addresses and routes. The first read waits, like the network controller, until the
boot's maintenance API listens: importing pyroute2 costs seconds under TCG
(docs/adr/0008-metal-pid1.md).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from basalt.machinery.errors import BasaltError
from basalt.machinery.resources.specs import AddressSpec, LinkSpec, RouteSpec

from ..runtime import ResourceStore
from ..sys import netlink
from .polling import PollingController

if TYPE_CHECKING:
    from ..node import Node


#: Seconds between two reads.
INTERVAL = 5.0

#: ifi_flags bits (linux/if.h) by name, as ``ip link`` prints them.
_LINK_FLAGS = (
    (0x1, "UP"),
    (0x2, "BROADCAST"),
    (0x8, "LOOPBACK"),
    (0x10, "POINTOPOINT"),
    (0x40, "RUNNING"),
    (0x80, "NOARP"),
    (0x100, "PROMISC"),
    (0x1000, "MULTICAST"),
    (0x10000, "LOWER_UP"),
)
#: ifa_flags bits (linux/if_addr.h).
_ADDRESS_FLAGS = (
    (0x01, "secondary"),
    (0x02, "nodad"),
    (0x04, "optimistic"),
    (0x08, "dadfailed"),
    (0x10, "homeaddress"),
    (0x20, "deprecated"),
    (0x40, "tentative"),
    (0x80, "permanent"),
    (0x100, "managetempaddr"),
    (0x200, "noprefixroute"),
)
#: ARPHRD_* hardware types (linux/if_arp.h) that have a common name.
_LINK_TYPES = {1: "ether", 512: "ppp", 768: "ipip", 772: "loopback", 776: "sit", 65534: "none"}
_FAMILIES: dict[int, str] = {int(socket.AF_INET): "inet", int(socket.AF_INET6): "inet6"}
_SCOPES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
_TABLES = {253: "default", 254: "main", 255: "local"}
_PROTOCOLS = {
    1: "redirect",
    2: "kernel",
    3: "boot",
    4: "static",
    16: "dhcp",
    186: "bgp",
    187: "isis",
    188: "ospf",
    189: "rip",
}
_ROUTE_TYPES = {
    1: "unicast",
    2: "local",
    3: "broadcast",
    4: "anycast",
    5: "multicast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
    9: "throw",
    10: "nat",
}


def flag_names(bits: int, table: tuple[tuple[int, str], ...]) -> list[str]:
    """The names of the bits set in ``bits`` (each name once, in table order)."""
    names: list[str] = []
    for bit, name in table:
        if bits & bit and name not in names:
            names.append(name)
    return names


def _named(table: Mapping[int, str], number: int) -> str:
    return table.get(number, str(number))


@dataclass
class NetworkState:
    """One read of the kernel's links, addresses and routes, by resource id."""

    links: dict[str, LinkSpec] = field(default_factory=dict)
    addresses: dict[str, AddressSpec] = field(default_factory=dict)
    routes: dict[str, RouteSpec] = field(default_factory=dict)


def _link_spec(msg: Any) -> LinkSpec:
    flags = int(msg.get("flags") or 0)
    return LinkSpec(
        index=int(msg.get("index")),
        type=_named(_LINK_TYPES, int(msg["ifi_type"])),
        mtu=int(msg.get("mtu") or 0),
        mac=str(msg.get("address") or ""),
        operstate=str(msg.get("operstate") or "").lower(),
        flags=flag_names(flags, _LINK_FLAGS),
        kind=str(msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""),
    )


def _address_spec(msg: Any, names: Mapping[int, str]) -> AddressSpec:
    # IFA_FLAGS (32 bits) supersedes the 8-bit ifa_flags when the kernel sends it.
    bits = int(msg.get("IFA_FLAGS") or msg.get("flags") or 0)
    index = int(msg.get("index"))
    return AddressSpec(
        link=names.get(index, str(index)),
        address=f"{msg.get('address') or msg.get('local')}/{msg['prefixlen']}",
        family=_named(_FAMILIES, int(msg["family"])),
        scope=_named(_SCOPES, int(msg["scope"])),
        flags=flag_names(bits, _ADDRESS_FLAGS),
    )


def _route_spec(msg: Any, names: Mapping[int, str]) -> RouteSpec:
    family = int(msg["family"])
    anywhere = "0.0.0.0" if family == socket.AF_INET else "::"
    oif = msg.get("oif")
    return RouteSpec(
        family=_named(_FAMILIES, family),
        destination=f"{msg.get('dst') or anywhere}/{msg['dst_len']}",
        gateway=str(msg.get("gateway") or ""),
        link=names.get(int(oif), str(oif)) if oif is not None else "",
        source=str(msg.get("prefsrc") or ""),
        table=_named(_TABLES, int(msg.get("table") or msg["table"])),
        metric=int(msg.get("priority") or 0),
        protocol=_named(_PROTOCOLS, int(msg["proto"])),
        scope=_named(_SCOPES, int(msg["scope"])),
        type=_named(_ROUTE_TYPES, int(msg["type"])),
    )


def route_id(route: RouteSpec) -> str:
    """``table/destination/link/metric`` (with ``/via/gateway`` when there is one)."""
    via = f"/via/{route.gateway}" if route.gateway else ""
    return f"{route.table}/{route.destination}/{route.link or '-'}/{route.metric}{via}"


def read_network(ipr: Any) -> NetworkState:
    """Every link, address and route (every table, both families) on ``ipr``'s socket."""
    state = NetworkState()
    names: dict[int, str] = {}
    for msg in ipr.get_links():
        spec = _link_spec(msg)
        name = str(msg.get("ifname"))
        names[spec.index] = name
        state.links[name] = spec
    for msg in ipr.get_addr():
        address = _address_spec(msg, names)
        state.addresses[f"{address.link}/{address.address}"] = address
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family):
            route = _route_spec(msg, names)
            state.routes.setdefault(route_id(route), route)
    return state


class NetworkStatusController(PollingController):
    """Publishes the kernel's links, addresses and routes; never changes them."""

    name = "network-status"
    outputs = ("Links", "Addresses", "Routes")
    after_api = True
    expected = (BasaltError, OSError)

    def __init__(self, node: Node, interval: float = INTERVAL) -> None:
        super().__init__(node, interval)

    async def refresh(self, store: ResourceStore) -> None:
        """One read of the kernel's tables into the store."""
        state = await netlink.call(read_network, "reading links, addresses and routes")
        self.publish(store, "Links", state.links)
        self.publish(store, "Addresses", state.addresses)
        self.publish(store, "Routes", state.routes)
