"""Links, addresses and routes through rtnetlink (pyroute2), without blocking the loop.

Each call opens its own netlink socket in a worker thread (``asyncio.to_thread``) and
calls run one at a time, so no pyroute2 object is ever shared between threads. Writes
are idempotent ("replace"), so reconciling twice changes nothing. Everything acts on
the network namespace of the calling process.

pyroute2 is imported on first use: it costs ~80 ms natively (seconds under TCG), and
only a metal node needs it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from basalt.machinery.errors import BasaltError

from .rtnl import (
    IFA_F_PERMANENT,
    IFF_LOOPBACK,
    IFF_LOWER_UP,
    IFF_UP,
    INFINITY_LIFE,
    PROTO_DHCP,
    PROTO_STATIC,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
)

__all__ = [
    "PROTO_DHCP",
    "PROTO_STATIC",
    "Address",
    "Link",
    "NetlinkError",
    "Route",
    "add_address",
    "addresses",
    "delete_address",
    "delete_route",
    "links",
    "replace_route",
    "routes",
    "set_link",
]

T = TypeVar("T")


_lock: asyncio.Lock | None = None
_lock_loop: asyncio.AbstractEventLoop | None = None


class NetlinkError(BasaltError):
    """The kernel refused a network change; the message says what was asked and why."""

    def __init__(self, message: str, *, code: int = 0, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    up: bool
    carrier: bool
    loopback: bool
    mtu: int
    mac: str
    kind: str | None


@dataclass(frozen=True)
class Address:
    """An address on a link, as ``interface`` (``"192.0.2.10/24"``)."""

    index: int
    interface: str
    scope: int
    permanent: bool
    valid_lft: int

    @property
    def ip(self) -> str:
        return self.interface.split("/")[0]

    @property
    def global_scope(self) -> bool:
        return self.scope == RT_SCOPE_UNIVERSE


@dataclass(frozen=True)
class Route:
    """A route in the main table; ``dst`` is a network (``"0.0.0.0/0"`` for default)."""

    dst: str
    gateway: str | None
    index: int | None
    metric: int
    protocol: int


def _get_lock() -> asyncio.Lock:
    global _lock, _lock_loop
    loop = asyncio.get_running_loop()
    if _lock is None or _lock_loop is not loop:
        _lock, _lock_loop = asyncio.Lock(), loop
    return _lock


def _with_socket(func: Callable[[Any], T], what: str) -> T:
    from pyroute2.iproute.linux import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError as _PyrouteError

    try:
        with IPRoute() as ipr:
            return func(ipr)
    except _PyrouteError as exc:
        code = int(exc.code or 0)
        reason = errno.errorcode.get(code, str(code))
        message = exc.args[1] if len(exc.args) > 1 else str(exc)
        raise NetlinkError(f"{what}: {message} ({reason})", code=code) from None


async def call(func: Callable[[Any], T], what: str) -> T:
    """Run ``func`` with a netlink socket (IPRoute) in a thread, one call at a time;
    pyroute2 errors become :class:`NetlinkError` naming ``what``."""
    async with _get_lock():
        return await asyncio.to_thread(_with_socket, func, what)


def _link(msg: Any) -> Link:
    flags = int(msg.get("flags") or 0)
    return Link(
        index=int(msg.get("index")),
        name=str(msg.get("ifname")),
        up=bool(flags & IFF_UP),
        carrier=bool(flags & IFF_LOWER_UP),
        loopback=bool(flags & IFF_LOOPBACK),
        mtu=int(msg.get("mtu") or 0),
        mac=str(msg.get("address") or ""),
        kind=msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
    )


async def links() -> list[Link]:
    """Every link, by index."""
    found = await call(lambda ipr: [_link(m) for m in ipr.get_links()], "listing links")
    return sorted(found, key=lambda link: link.index)


async def set_link(index: int, *, up: bool | None = None, mtu: int | None = None) -> None:
    """Bring link ``index`` up or down and/or set its MTU (unset arguments stay)."""
    changes: dict[str, Any] = {}
    if mtu is not None:
        changes["mtu"] = mtu
    if up is not None:
        changes["state"] = "up" if up else "down"
    if changes:
        what = f"setting link {index} " + " ".join(f"{k}={v}" for k, v in changes.items())
        await call(lambda ipr: ipr.link("set", index=index, **changes), what)


def _address(msg: Any) -> Address:
    cache = msg.get("IFA_CACHEINFO") or {}
    return Address(
        index=int(msg.get("index")),
        interface=f"{msg.get('address')}/{msg.get('prefixlen')}",
        scope=int(msg.get("scope") or 0),
        permanent=bool(int(msg.get("flags") or 0) & IFA_F_PERMANENT),
        valid_lft=int(cache.get("ifa_valid", INFINITY_LIFE)),
    )


async def addresses(index: int | None = None) -> list[Address]:
    """Addresses (IPv4 and IPv6) on link ``index``, or on every link."""
    query = {"index": index} if index is not None else {}
    return await call(lambda ipr: [_address(m) for m in ipr.get_addr(**query)], "listing addresses")


def _address_args(index: int, interface: str) -> dict[str, Any]:
    iface = ipaddress.ip_interface(interface)
    args: dict[str, Any] = {
        "index": index,
        "address": str(iface.ip),
        "prefixlen": iface.network.prefixlen,
    }
    if iface.version == 4 and iface.network.prefixlen < 31:
        args["broadcast"] = str(iface.network.broadcast_address)
    return args


async def add_address(
    index: int, interface: str, *, valid_lft: int | None = None, preferred_lft: int | None = None
) -> None:
    """Add (or refresh) ``interface`` (``"192.0.2.10/24"``) on link ``index``.

    With ``valid_lft`` the kernel removes the address by itself when it runs out (a
    DHCP lease that machined can no longer renew does not outlive its lease).
    """
    args = _address_args(index, interface)
    if valid_lft is not None:
        args["valid_lft"] = valid_lft
        args["preferred_lft"] = valid_lft if preferred_lft is None else preferred_lft
    await call(
        lambda ipr: ipr.addr("replace", **args), f"adding address {interface} to link {index}"
    )


async def delete_address(index: int, interface: str) -> None:
    """Remove ``interface`` from link ``index``; an address that is not there is fine."""
    args = _address_args(index, interface)

    def delete(ipr: Any) -> None:
        from pyroute2.netlink.exceptions import NetlinkError as _PyrouteError

        try:
            ipr.addr("del", **args)
        except _PyrouteError as exc:
            if exc.code != errno.EADDRNOTAVAIL:
                raise

    await call(delete, f"removing address {interface} from link {index}")


def _route(msg: Any, family: int) -> Route:
    default = "0.0.0.0" if family == 2 else "::"
    dst = f"{msg.get('dst') or default}/{msg.get('dst_len')}"
    return Route(
        dst=str(ipaddress.ip_network(dst, strict=False)),
        gateway=msg.get("gateway"),
        index=msg.get("oif"),
        metric=int(msg.get("priority") or 0),
        protocol=int(msg.get("proto") or 0),
    )


async def routes(family: int = 2) -> list[Route]:
    """Unicast routes of the main table for ``family`` (2: IPv4, 10: IPv6)."""

    def listing(ipr: Any) -> list[Route]:
        return [
            _route(m, family)
            for m in ipr.get_routes(family=family, table=RT_TABLE_MAIN)
            if m.get("type") == 1  # RTN_UNICAST
        ]

    return await call(listing, "listing routes")


def _route_args(
    dst: str, gateway: str | None, index: int, metric: int, protocol: int
) -> dict[str, Any]:
    network = ipaddress.ip_network(dst, strict=False)
    args: dict[str, Any] = {
        "dst": str(network),
        "oif": index,
        "priority": metric,
        "proto": protocol,
        "table": RT_TABLE_MAIN,
        "family": 10 if network.version == 6 else 2,
    }
    if gateway:
        args["gateway"] = gateway
    else:
        args["scope"] = RT_SCOPE_LINK
    return args


async def replace_route(
    dst: str,
    gateway: str | None,
    index: int,
    *,
    metric: int = 1024,
    protocol: int = PROTO_STATIC,
) -> None:
    """Make ``dst`` go via ``gateway`` (or directly, when None) out of link ``index``."""
    args = _route_args(dst, gateway, index, metric, protocol)
    via = f" via {gateway}" if gateway else ""
    await call(
        lambda ipr: ipr.route("replace", **args),
        f"adding route {dst}{via} (link {index}, metric {metric})",
    )


async def delete_route(
    dst: str, gateway: str | None, index: int, *, metric: int = 1024, protocol: int = PROTO_STATIC
) -> None:
    """Remove the route; a route that is not there is fine."""
    args = _route_args(dst, gateway, index, metric, protocol)

    def delete(ipr: Any) -> None:
        from pyroute2.netlink.exceptions import NetlinkError as _PyrouteError

        try:
            ipr.route("del", **args)
        except _PyrouteError as exc:
            if exc.code != errno.ESRCH:
                raise

    await call(delete, f"removing route {dst} (link {index})")
