"""Kernel parameters through /proc/sys, and the kernel's host and domain names."""

from __future__ import annotations

import os
import socket
from pathlib import Path, PurePosixPath

__all__ = ["PROC_SYS", "read_sysctl", "set_hostname", "sysctl_path", "write_sysctl"]

PROC_SYS = Path("/proc/sys")


def sysctl_path(key: str, root: Path = PROC_SYS) -> Path:
    """``net.ipv4.ip_forward`` -> ``/proc/sys/net/ipv4/ip_forward``.

    As with sysctl(8), the first separator decides: with a ``/`` first the key is a
    path and dots stay (``net/ipv4/conf/eth0.100/forwarding``); otherwise every dot
    separates. Raises ValueError for keys that would leave ``root``.
    """
    slash, dot = key.find("/"), key.find(".")
    as_path = slash != -1 and (dot == -1 or slash < dot)
    parts = key.split("/") if as_path else key.split(".")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{key!r} is not a sysctl name")
    return root.joinpath(*PurePosixPath(*parts).parts)


def read_sysctl(key: str, root: Path = PROC_SYS) -> str:
    return sysctl_path(key, root).read_text().strip()


def write_sysctl(key: str, value: str, root: Path = PROC_SYS) -> None:
    """Write ``value`` as one write(2), as the kernel expects; raises OSError."""
    fd = os.open(sysctl_path(key, root), os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def set_hostname(hostname: str, domainname: str = "", root: Path = PROC_SYS) -> None:
    """sethostname(2), and the NIS domain name (``(none)`` when empty)."""
    socket.sethostname(hostname)
    write_sysctl("kernel.domainname", domainname or "(none)", root)
