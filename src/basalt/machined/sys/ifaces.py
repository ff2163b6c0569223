"""Links as sysfs shows them, and bringing one up with an ioctl: stdlib only.

This is what the DHCP client needs to start before :mod:`.netlink` has imported
pyroute2, which takes seconds under TCG (docs/adr/0008): at boot the network controller
starts DHCP with these while the API opens, and does everything else through netlink.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from pathlib import Path

from .netlink import IFF_LOOPBACK, IFF_UP, Link, NetlinkError

__all__ = ["SYS_CLASS_NET", "set_up", "sysfs_links"]

SYS_CLASS_NET = Path("/sys/class/net")
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
ARPHRD_ETHER = 1
#: struct ifreq: the name (IFNAMSIZ bytes), then a union whose first member here is the
#: (unsigned) short ifr_flags; 40 bytes in all on 64-bit Linux.
_IFREQ = struct.Struct("16sH22x")


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
