"""The host name on metal: Hostnames/hostname -> the kernel, /etc/hostname and /etc/hosts.

/etc/hosts maps the host name to the node's first address (NodeAddresses). In
container mode the host's name is the host's business: this controller does nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..platform.etc import render_hosts, write_generated
from ..runtime import Controller, ResourceStore
from ..sys.sysctl import set_hostname

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)


class HostnameApplyController(Controller):
    name = "hostname-apply"
    inputs = ("Hostnames", "NodeAddresses")

    def __init__(self, node: Node) -> None:
        self.node = node
        self._applied: tuple[str, str] | None = None

    async def reconcile(self, store: ResourceStore) -> None:
        platform = self.node.platform
        if not platform.mode.manages_kernel:
            return
        resource = store.get("Hostnames", "hostname")
        if resource is None:
            return
        hostname = str(getattr(resource.spec, "hostname", ""))
        domain = str(getattr(resource.spec, "domainname", ""))
        addresses = store.get("NodeAddresses", "current")
        listed = list(getattr(addresses.spec, "addresses", [])) if addresses else []
        address = listed[0] if listed else None
        if (hostname, domain) != self._applied:
            proc_sys = platform.system_root / "proc" / "sys"
            await asyncio.to_thread(set_hostname, hostname, domain, proc_sys)
            self._applied = (hostname, domain)
            log.info("host name is %s", f"{hostname}.{domain}" if domain else hostname)
        directory = platform.generated_etc
        await asyncio.to_thread(write_generated, directory, "hostname", f"{hostname}\n")
        hosts = render_hosts(hostname, domain, address)
        await asyncio.to_thread(write_generated, directory, "hosts", hosts)
