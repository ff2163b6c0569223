"""The composition root: the one place that builds a node and wires its parts.

:func:`build_node` makes the plain :class:`~.node.Node`, then the parts above it — the
upgrader, the sequences (registered by name), and the :class:`Wiring` through which the
boot sequence gets its controllers, servers and services (the API servers and the etcd
manager: :mod:`.system_services`) — and hands each what it needs. Nothing
below this module constructs a part of a higher layer; it is reached through the
interfaces in :mod:`.ports` instead (docs/architecture.md).

Servers and services are imported when first asked for: a first boot opens its
maintenance API before it needs etcd's or containerd's modules.
"""

from __future__ import annotations

from .node import Node, Tuning
from .platform import Platform
from .ports import Server
from .sequencer.sequences import SEQUENCES
from .upgrade import Upgrader

__all__ = ["Wiring", "build_node"]


class Wiring:
    """The boot sequence's way to the parts it may not build itself (:class:`.ports.Wiring`)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def start_controllers(self) -> None:
        from .controllers import start_engine
        from .updater import UpdateController

        start_engine(self.node, [UpdateController(self.node)])

    def maintenance_api(self) -> Server:
        from .api.server import ApiServer

        return ApiServer(self.node, maintenance=True)

    def register_services(self) -> None:
        from .system_services import register_system_services

        register_system_services(self.node)


def build_node(platform: Platform, tuning: Tuning | None = None) -> Node:
    """A node on ``platform`` with every part wired; nothing runs until it boots."""
    node = Node(platform, tuning or Tuning())
    node.upgrader = Upgrader(node)
    node.wiring = Wiring(node)
    node.sequencer.register(SEQUENCES)
    return node
