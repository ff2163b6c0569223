"""Hostnames/hostname: from HostnameConfig, else the platform's name for the node."""

from __future__ import annotations

from typing import TYPE_CHECKING

from basalt.machinery.resources import HostnameSpec

from ..runtime import Controller, ResourceStore

if TYPE_CHECKING:
    from ..node import Node


class HostnameController(Controller):
    name = "hostname"
    inputs = ("MachineConfigs",)
    outputs = ("Hostnames",)

    def __init__(self, node: Node) -> None:
        self.node = node

    async def reconcile(self, store: ResourceStore) -> None:
        hostname, _, domain = self.node.hostname.partition(".")
        store.put(
            "Hostnames",
            "hostname",
            HostnameSpec(hostname=hostname, domainname=domain),
            owner=self.name,
        )
