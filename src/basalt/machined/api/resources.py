"""ResourceService: get, list and watch the node's resources."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from basalt.machinery.api import common_pb2, resource_pb2, resource_pb2_grpc
from basalt.machinery.resources import ResourceDefinition, ResourceDefinitionSpec, resolve_type
from basalt.machinery.resources.definitions import DEFINITIONS
from basalt.machinery.roles import Role

from ..runtime.store import Resource, ResourceMeta
from .auth import answer_metadata, current_principal
from .errors import AccessDeniedError, NotFoundError

if TYPE_CHECKING:
    from ..node import Node

Context = grpc.aio.ServicerContext[Any, Any]
_EVENTS = {
    "created": resource_pb2.CREATED,
    "updated": resource_pb2.UPDATED,
    "destroyed": resource_pb2.DESTROYED,
    "bootstrapped": resource_pb2.BOOTSTRAPPED,
}


def to_proto(resource: Resource) -> resource_pb2.Resource:
    meta = resource.meta
    return resource_pb2.Resource(
        metadata=resource_pb2.ResourceMetadata(
            namespace=meta.namespace,
            type=meta.type,
            id=meta.id,
            version=meta.version,
            created=meta.created,
            updated=meta.updated,
            owner=meta.owner,
            phase=meta.phase,
        ),
        spec_json=resource.spec_json(),
    )


def _definition_resources() -> list[Resource]:
    out = []
    for d in DEFINITIONS:
        spec = ResourceDefinitionSpec(
            type=d.type,
            namespace=d.namespace,
            aliases=list(d.aliases),
            sensitive=d.sensitive,
            description=d.description,
        )
        meta = ResourceMeta("meta", "ResourceDefinitions", d.type.lower(), 1, 0.0, 0.0, "machined")
        out.append(Resource(meta, spec))
    return out


def _redacted_machine_config(spec: Any) -> Any:
    # Imported here: the maintenance API opens before the config models are loaded.
    from basalt.machinery.config.redact import redact_config_text
    from basalt.machinery.resources.specs import MachineConfigSpec

    return MachineConfigSpec(yaml=redact_config_text(spec.yaml), staged=spec.staged)


#: Sensitive types that roles below os:admin read with their secrets redacted.
_REDACTED: dict[str, Callable[[Any], Any]] = {"MachineConfigs": _redacted_machine_config}


class ResourceServicer(resource_pb2_grpc.ResourceServiceServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    def meta(self) -> common_pb2.Metadata:
        return answer_metadata(self.node.address)

    def _definition(self, type_name: str) -> ResourceDefinition:
        definition = resolve_type(type_name)
        if not definition.sensitive:
            return definition
        principal = current_principal.get()
        if Role.ADMIN in principal.roles:
            # An admin reads the secrets: say who did, as for every other secret read.
            self.node.events.publish(
                "secrets",
                f"{definition.type} read with its secrets",
                actor="apid",
                subject=principal.subject or "(unknown)",
            )
        elif definition.type not in _REDACTED:
            raise AccessDeniedError(
                f"{definition.type} is sensitive (it holds secrets); only os:admin may read it"
            )
        return definition

    def _out(self, resource: Resource) -> resource_pb2.Resource:
        """The resource as the caller may see it: secrets redacted below os:admin."""
        redact = _REDACTED.get(resource.meta.type)
        if redact is not None and Role.ADMIN not in current_principal.get().roles:
            resource = Resource(resource.meta, redact(resource.spec))
        return to_proto(resource)

    def _list(self, definition: ResourceDefinition) -> list[Resource]:
        if definition.type == "ResourceDefinitions":
            return _definition_resources()
        return self.node.store.list(definition.type)

    async def Get(self, request: resource_pb2.ResourceGetRequest, context: Context) -> Any:
        definition = self._definition(request.type)
        found = [r for r in self._list(definition) if r.meta.id == request.id]
        if not found:
            raise NotFoundError(
                f"{definition.type} {request.id!r} not found",
                hint=f"list them with 'basaltctl get {definition.aliases[0]}'",
            )
        answer = resource_pb2.ResourceGet(metadata=self.meta(), resource=self._out(found[0]))
        return resource_pb2.ResourceGetResponse(messages=[answer])

    async def List(
        self, request: resource_pb2.ResourceListRequest, context: Context
    ) -> AsyncIterator[Any]:
        definition = self._definition(request.type)
        meta = self.meta()
        for resource in self._list(definition):
            yield resource_pb2.ResourceListResponse(metadata=meta, resource=self._out(resource))

    async def Watch(
        self, request: resource_pb2.ResourceWatchRequest, context: Context
    ) -> AsyncIterator[Any]:
        definition = self._definition(request.type)
        meta = self.meta()
        if definition.type == "ResourceDefinitions":
            for resource in _definition_resources():
                yield resource_pb2.ResourceWatchResponse(
                    metadata=meta, event=resource_pb2.CREATED, resource=to_proto(resource)
                )
            return
        async for event in self.node.store.watch(
            definition.type, request.id or None, tail=request.tail
        ):
            message = resource_pb2.ResourceWatchResponse(metadata=meta, event=_EVENTS[event.kind])
            if event.resource is not None:
                message.resource.CopyFrom(self._out(event.resource))
            yield message
