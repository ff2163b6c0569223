"""Controllers: one module per domain, each turning config into resources."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..runtime import Controller, ControllerEngine
from .discovery import DiscoveryController
from .hostname import HostnameController
from .kernel_params import KernelParamsController
from .kubernetes import KubernetesAssetsController
from .members import MembersController
from .network_status import NetworkStatusController
from .node_addresses import NodeAddressesController
from .storage_status import StorageStatusController
from .system_stats import SystemStatsController
from .version import VersionController

if TYPE_CHECKING:
    from ..node import Node


def _machine_controllers(node: Node) -> list[Controller]:
    """Network, resolvers, host name, sysctls, kernel modules and time: only where the agent
    owns the machine (metal). Each also checks the platform's capabilities itself."""
    mode = node.platform.mode
    if not (mode.manages_network or mode.manages_kernel):
        return []  # and their modules are not even imported
    from .hostname_apply import HostnameApplyController
    from .kernel_modules import KernelModulesController
    from .network import NetworkController
    from .resolvers import ResolversController
    from .sysctls import SysctlsController
    from .timesync import TimeSyncController

    network = NetworkController(node)
    return [
        network,
        ResolversController(node, network.leases),
        HostnameApplyController(node),
        SysctlsController(node),
        KernelModulesController(node),
        TimeSyncController(node),
    ]


def start_engine(node: Node, extra: Sequence[Controller] = ()) -> ControllerEngine:
    """The node's controllers (and ``extra`` ones from above this layer: the updater)."""
    if node.engine is None:
        node.engine = ControllerEngine(
            node.store,
            [
                VersionController(node),
                HostnameController(node),
                NodeAddressesController(node),
                *_machine_controllers(node),
                DiscoveryController(node),
                MembersController(node),
                KubernetesAssetsController(node),
                SystemStatsController(node),
                NetworkStatusController(node),
                StorageStatusController(node),
                KernelParamsController(node),
                *extra,
            ],
        )
        node.engine.start()
    return node.engine
