"""Start and stop the node's gRPC servers: the API (maintenance or mTLS) and trust."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from basalt.machinery.api import (
    API_PORT,
    TRUST_PORT,
    machine_pb2_grpc,
    resource_pb2_grpc,
    trust_pb2_grpc,
)
from basalt.machinery.client.client import MAX_MESSAGE

from . import certificate_helper
from .dispatch import MAX_REQUEST, Dispatcher
from .tls import mtls_credentials, prepared_maintenance_credentials

if TYPE_CHECKING:
    from basalt.machinery.pki import CertificateAndKey

    from ..node import Node
    from .proxy import Proxy

log = logging.getLogger(__name__)

SERVER_OPTIONS: list[tuple[str, Any]] = [
    # No request message is larger than a method's limit (dispatch.REQUEST_LIMITS).
    ("grpc.max_receive_message_length", MAX_REQUEST),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_concurrent_streams", 256),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


class ServerStartError(Exception):
    pass


def _bind(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def server_identity(node: Node) -> tuple[str, CertificateAndKey]:
    """The CAs trusted for clients (the OS CA and ``acceptedCAs``) and the node's server
    certificate, as the TLS handshake wants them now (a renewed certificate or a changed
    bundle is used from the next handshake on)."""
    from ..certificates import served_chain, trust_bundle

    identity = node.identity
    assert identity is not None, "a server with mTLS starts once the node has its identity"
    return trust_bundle(node), served_chain(node, identity)


class ApiServer:
    """The machine API on ``address:50000``."""

    def __init__(self, node: Node, *, maintenance: bool) -> None:
        self.node = node
        self.maintenance = maintenance
        self.proxy: Proxy | None = None
        forward = None
        if not maintenance:  # a maintenance API forwards nothing
            from .proxy import Proxy, member_resolver

            self.proxy = Proxy(
                self._forwarding_credentials, member_resolver(node), lambda: member_addresses(node)
            )
            forward = self.proxy.handler
        self.dispatcher = Dispatcher(
            maintenance=maintenance, rbac_enabled=self._rbac_enabled, forward=forward
        )
        # The servicers (and the modules behind every RPC) are built when first served: a
        # first boot's maintenance API opens without them, then builds the machine
        # servicer in the background (start); the resource service's calls are all
        # refused in maintenance mode, so there it is never built.
        self._machine = self.dispatcher.register_deferred(
            machine_pb2_grpc.add_MachineServiceServicer_to_server,
            machine_pb2_grpc.MachineServiceServicer(),  # type: ignore[abstract]
            lambda: _machine_servicer(node, maintenance),
        )
        self.dispatcher.register_deferred(
            resource_pb2_grpc.add_ResourceServiceServicer_to_server,
            resource_pb2_grpc.ResourceServiceServicer(),  # type: ignore[abstract]
            lambda: _resource_servicer(node),
        )
        self._warming: asyncio.Task[object] | None = None
        self.server: grpc.aio.Server | None = None

    def _rbac_enabled(self) -> bool:
        machine = self.node.machine
        return machine.features.rbac if machine is not None else True

    def _forwarding_credentials(self) -> tuple[str, CertificateAndKey] | None:
        from .proxy import forwarding_credentials

        return forwarding_credentials(self.node)

    def _current_identity(self) -> tuple[str, CertificateAndKey]:
        return server_identity(self.node)

    async def start(self) -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((self.dispatcher,))
        if self.maintenance:
            credentials = await prepared_maintenance_credentials(self.node.address)
        else:
            certificate_helper.discard()  # a node with a config: no maintenance certificate
            credentials = mtls_credentials(self._current_identity)
        bind = _bind(self.node.address, API_PORT)
        try:
            server.add_secure_port(bind, credentials)
        except RuntimeError as exc:
            raise ServerStartError(f"cannot listen on {bind}: {exc}") from None
        await server.start()
        self.server = server
        log.info("API listening on %s (%s)", bind, "maintenance" if self.maintenance else "mTLS")
        # Built in a thread while the boot goes on (the network comes up meanwhile), so
        # the first call does not wait for it; a call before then builds it itself.
        self._warming = asyncio.create_task(asyncio.to_thread(self._machine.build))
        self._warming.add_done_callback(_log_failure)

    async def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
        if self.proxy is not None:
            await self.proxy.close()
        if self._warming is not None:
            # A thread cannot be interrupted: the build ends on its own (and is kept).
            await asyncio.gather(self._warming, return_exceptions=True)
            self._warming = None


class TrustServer:
    """The trust service on control planes: ``address:50001``, TLS, token-authenticated."""

    def __init__(self, node: Node) -> None:
        from .trust import TrustServicer

        self.node = node
        self.servicer = TrustServicer(node)
        self.server: grpc.aio.Server | None = None

    def _current_identity(self) -> tuple[str, CertificateAndKey]:
        return server_identity(self.node)

    async def start(self) -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        trust_pb2_grpc.add_TrustServiceServicer_to_server(self.servicer, server)
        bind = _bind(self.node.address, TRUST_PORT)
        try:
            credentials = mtls_credentials(self._current_identity, require_client_certificate=False)
            server.add_secure_port(bind, credentials)
        except RuntimeError as exc:
            raise ServerStartError(f"cannot listen on {bind}: {exc}") from None
        await server.start()
        self.server = server

    async def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None


def _log_failure(task: asyncio.Task[object]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the machine service could not be built: %s", task.exception())


def _machine_servicer(node: Node, maintenance: bool) -> object:
    from .machine import MachineServicer

    return MachineServicer(node, maintenance=maintenance)


def _resource_servicer(node: Node) -> object:
    from .resources import ResourceServicer

    return ResourceServicer(node)


def member_addresses(node: Node) -> set[str]:
    """Every address forwarding may dial now (for evicting cached channels)."""
    found = {node.address}
    for member in list(node.members.values()):
        found.update(str(a) for a in member.addresses)
    return found
