"""The ControllerGraph RPC of MachineService (a mixin of MachineServicer): which
controller reads and writes which resource type, for ``basaltctl inspect dependencies``.

Dependency kinds: ``input`` and ``output`` are what each controller of the engine
declares (it runs again when an input changes; it writes its outputs). ``writes`` is
found in the store instead: every owner of a resource that no declaration explains, so
the graph shows what really writes each type, including the parts of machined outside
the controller engine (the boot sequence, the etcd observer, the trust service, the
updater). A controller listed with ``writes`` writes a type it does not declare: a bug
that tests/unit/test_resources_toolbox.py looks for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.resources.definitions import DEFINITIONS

if TYPE_CHECKING:
    from ..node import Node
    from ..runtime import Controller, ResourceStore

Context = grpc.aio.ServicerContext[Any, Any]


def declared_nodes(controllers: list[Controller]) -> list[machine_pb2.ControllerNode]:
    """One node per controller with its declared inputs and outputs."""
    nodes = []
    for controller in controllers:
        deps = [
            machine_pb2.ControllerDependency(resource_type=t, kind="input")
            for t in controller.inputs
        ]
        deps += [
            machine_pb2.ControllerDependency(resource_type=t, kind="output")
            for t in controller.outputs
        ]
        nodes.append(machine_pb2.ControllerNode(name=controller.name, dependencies=deps))
    return nodes


def found_writers(store: ResourceStore, declared: dict[str, set[str]]) -> dict[str, set[str]]:
    """Owner -> resource types it owns in ``store`` that ``declared`` (controller name ->
    declared outputs) does not account for."""
    found: dict[str, set[str]] = {}
    for definition in DEFINITIONS:
        for resource in store.list(definition.type):
            owner = resource.meta.owner
            if definition.type not in declared.get(owner, set()):
                found.setdefault(owner, set()).add(definition.type)
    return found


def controller_graph(
    store: ResourceStore, controllers: list[Controller], *, with_resources: bool
) -> tuple[list[machine_pb2.ControllerNode], dict[str, int]]:
    """The graph's nodes (declared, then found in the store) and, when asked, the
    number of resources of each type."""
    nodes = declared_nodes(controllers)
    by_name = {node.name: node for node in nodes}
    declared = {c.name: set(c.outputs) for c in controllers}
    for owner, types in sorted(found_writers(store, declared).items()):
        node = by_name.get(owner)
        if node is None:
            node = by_name[owner] = machine_pb2.ControllerNode(name=owner)
            nodes.append(node)
        node.dependencies.extend(
            machine_pb2.ControllerDependency(resource_type=t, kind="writes") for t in sorted(types)
        )
    counts: dict[str, int] = {}
    if with_resources:
        for definition in DEFINITIONS:
            if definition.type == "ResourceDefinitions":
                counts[definition.type] = len(DEFINITIONS)
            else:
                counts[definition.type] = len(store.list(definition.type))
    return nodes, counts


class GraphMethods:
    node: Node

    def meta(self) -> common_pb2.Metadata:
        raise NotImplementedError

    async def ControllerGraph(
        self, request: machine_pb2.ControllerGraphRequest, context: Context
    ) -> Any:
        engine = self.node.engine
        controllers = list(engine.controllers) if engine is not None else []
        nodes, counts = controller_graph(
            self.node.store, controllers, with_resources=request.with_resources
        )
        answer = machine_pb2.ControllerGraph(metadata=self.meta(), controllers=nodes, counts=counts)
        return machine_pb2.ControllerGraphResponse(messages=[answer])
