"""Links as sysfs shows them, and bringing one up with an ioctl: stdlib only.

This is what a first DHCP lease needs before :mod:`.netlink` has imported pyroute2,
which takes seconds under TCG (docs/adr/0008): at boot the network controller starts
DHCP with these, and puts the lease's address and routes on the link, while the API
opens; everything else goes through netlink.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from pathlib import Path

from .netlink import Link, NetlinkError
from .rtnl import (
    IFA_ADDRESS,
    IFA_BROADCAST,
    IFA_CACHEINFO,
    IFA_LOCAL,
    IFF_LOOPBACK,
    IFF_UP,
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    RTA_DST,
    RTA_GATEWAY,
    RTA_OIF,
    RTA_PRIORITY,
    RTM_NEWADDR,
    RTM_NEWROUTE,
    RTN_UNICAST,
)

__all__ = [
    "SYS_CLASS_NET",
    "replace_address",
    "replace_route",
    "set_mtu",
    "set_up",
    "sysfs_links",
]

SYS_CLASS_NET = Path("/sys/class/net")
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
ARPHRD_ETHER = 1
#: struct ifreq: the name (IFNAMSIZ bytes), then a union whose first member here is the
#: (unsigned) short ifr_flags; 40 bytes in all on 64-bit Linux.
_IFREQ = struct.Struct("16sH22x")
#: struct ifreq with the int ifr_mtu.
_IFREQ_INT = struct.Struct("16si20x")


def _read(entry: Path, name: str) -> str:
    return (entry / name).read_text().strip()


def sysfs_links(sys_class_net: Path = SYS_CLASS_NET) -> list[Link]:
    """Every link of this network namespace (sysfs must be mounted in it), by index.
    ``kind`` is None for a link backed by a device (a NIC), ``"virtual"`` otherwise:
    sysfs does not name the kind, and callers only tell physical links from others."""
    found = []
    try:
        entries = list(sys_class_net.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            flags = int(_read(entry, "flags"), 16)
            link = Link(
                index=int(_read(entry, "ifindex")),
                name=entry.name,
                up=bool(flags & IFF_UP),
                carrier=_read(entry, "operstate") == "up",
                loopback=bool(flags & IFF_LOOPBACK),
                mtu=int(_read(entry, "mtu")),
                mac=_read(entry, "address") if _read(entry, "type") == str(ARPHRD_ETHER) else "",
                kind=None if (entry / "device").exists() else "virtual",
            )
        except (OSError, ValueError):
            continue  # gone meanwhile, or not a link
        found.append(link)
    return sorted(found, key=lambda link: link.index)


def set_mtu(name: str, mtu: int) -> None:
    """Set link ``name``'s MTU (SIOCSIFMTU)."""
    encoded = os.fsencode(name)
    if not encoded or len(encoded) >= 16:
        raise NetlinkError(f"set the MTU of {name!r}: not a link name")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock.fileno(), SIOCSIFMTU, _IFREQ_INT.pack(encoded, mtu))
        except OSError as exc:
            raise NetlinkError(
                f"set the MTU of {name} to {mtu}: {exc.strerror}", code=exc.errno or 0
            ) from None


def set_up(name: str) -> None:
    """Set IFF_UP on link ``name`` (SIOCSIFFLAGS), keeping its other flags."""
    encoded = os.fsencode(name)
    if not encoded or len(encoded) >= 16:
        raise NetlinkError(f"bring {name!r} up: not a link name")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            answer = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, _IFREQ.pack(encoded, 0))
            flags = _IFREQ.unpack(answer)[1]
            if not flags & IFF_UP:
                fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, _IFREQ.pack(encoded, flags | IFF_UP))
        except OSError as exc:
            raise NetlinkError(f"bring {name} up: {exc.strerror}", code=exc.errno or 0) from None


# -- a DHCP lease through rtnetlink directly ------------------------------------------------------
# Just the two requests a first lease needs (an IPv4 address with its lifetime, and its
# routes), so the address is on the link before pyroute2 is imported; the same
# "replace" semantics as netlink.add_address and netlink.replace_route.

_NLMSGHDR = struct.Struct("=IHHII")


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + bytes(-length % 4)


def _request(kind: int, body: bytes, what: str) -> None:
    """Send one rtnetlink request that creates or replaces, and wait for its ack."""
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    message = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        try:
            sock.bind((0, 0))
            sock.send(message)
            answer = sock.recv(65536)
        except OSError as exc:
            raise NetlinkError(f"{what}: {exc.strerror}", code=exc.errno or 0) from None
    _, answer_kind, _, _, _ = _NLMSGHDR.unpack_from(answer)
    if answer_kind != NLMSG_ERROR:
        raise NetlinkError(f"{what}: the kernel answered message type {answer_kind}, not an ack")
    (error,) = struct.unpack_from("=i", answer, _NLMSGHDR.size)
    if error:
        code = -error
        raise NetlinkError(f"{what}: {os.strerror(code)}", code=code)


def replace_address(index: int, interface: str, valid_lft: int) -> None:
    """Add (or refresh) the IPv4 ``interface`` on link ``index``, removed by the kernel
    after ``valid_lft`` seconds (as :func:`.netlink.add_address` with a lifetime)."""
    iface = ipaddress.IPv4Interface(interface)
    prefix = iface.network.prefixlen
    body = struct.pack("=BBBBI", socket.AF_INET, prefix, 0, RT_SCOPE_UNIVERSE, index)
    body += _attr(IFA_LOCAL, iface.ip.packed) + _attr(IFA_ADDRESS, iface.ip.packed)
    if prefix < 31:
        body += _attr(IFA_BROADCAST, iface.network.broadcast_address.packed)
    body += _attr(IFA_CACHEINFO, struct.pack("=IIII", valid_lft, valid_lft, 0, 0))
    _request(RTM_NEWADDR, body, f"adding address {interface} to link {index}")


def replace_route(dst: str, gateway: str | None, index: int, *, metric: int, protocol: int) -> None:
    """Make the IPv4 ``dst`` go via ``gateway`` (or directly) out of link ``index`` (as
    :func:`.netlink.replace_route`)."""
    network = ipaddress.IPv4Network(dst, strict=False)
    scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
    body = struct.pack(
        "=BBBBBBBBI",
        socket.AF_INET,
        network.prefixlen,
        0,
        0,
        RT_TABLE_MAIN,
        protocol,
        scope,
        RTN_UNICAST,
        0,
    )
    if network.prefixlen:
        body += _attr(RTA_DST, network.network_address.packed)
    if gateway:
        body += _attr(RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed)
    body += _attr(RTA_OIF, struct.pack("=I", index)) + _attr(
        RTA_PRIORITY, struct.pack("=I", metric)
    )
    via = f" via {gateway}" if gateway else ""
    _request(RTM_NEWROUTE, body, f"adding route {dst}{via} (link {index}, metric {metric})")
