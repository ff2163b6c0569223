"""The /etc files a metal node generates: hostname, hosts and resolv.conf.

They are written in /run/basalt/etc and bind-mounted read-only over the image's /etc
files (see :mod:`basalt.machined.platform.metal`).
"""

from __future__ import annotations

import os
from pathlib import Path

from basalt.machinery.image_layout import GENERATED_ETC_FILES

__all__ = ["GENERATED_ETC_FILES", "render_hosts", "write_generated"]


def render_hosts(hostname: str, domainname: str = "", address: str | None = None) -> str:
    """/etc/hosts: localhost, and the node's own names on its address."""
    fqdn = f"{hostname}.{domainname}" if domainname else ""
    names = " ".join(n for n in (fqdn, hostname) if n)
    own = address if address and address != "0.0.0.0" else "127.0.1.1"
    return f"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n{own} {names}\n"


def write_generated(directory: Path, name: str, text: str) -> bool:
    """Write a generated /etc file in place; False when it already says ``text``.

    In place (truncate, write) rather than by rename: /etc/NAME is a bind mount of this
    very inode, and a rename would leave the bind mount showing the old file.
    """
    path = directory / name
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return True
