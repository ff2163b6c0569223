"""Controllers: one module per domain, each turning config into resources."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..runtime import ControllerEngine
from .hostname import HostnameController
from .kubernetes import KubernetesAssetsController
from .members import MembersController
from .node_addresses import NodeAddressesController
from .version import VersionController

if TYPE_CHECKING:
    from ..node import Node


def start_engine(node: Node) -> ControllerEngine:
    if node.engine is None:
        node.engine = ControllerEngine(
            node.store,
            [
                VersionController(node),
                HostnameController(node),
                NodeAddressesController(node),
                MembersController(node),
                KubernetesAssetsController(node),
            ],
        )
        node.engine.start()
    return node.engine
