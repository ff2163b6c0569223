"""NodeAddresses/current: the addresses the node serves on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from basalt.machinery.resources import NodeAddressesSpec

from ..runtime import Controller, ResourceStore

if TYPE_CHECKING:
    from ..node import Node


class NodeAddressesController(Controller):
    name = "node-addresses"
    inputs = ("MachineConfigs",)
    outputs = ("NodeAddresses",)

    def __init__(self, node: Node) -> None:
        self.node = node

    async def reconcile(self, store: ResourceStore) -> None:
        if self.node.platform.mode.manages_network:
            return  # the network controller publishes what is configured on the links
        store.put(
            "NodeAddresses",
            "current",
            NodeAddressesSpec(addresses=[self.node.address]),
            owner=self.name,
        )
