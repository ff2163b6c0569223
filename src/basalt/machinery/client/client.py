"""The async client of the machine API: mTLS to an endpoint, requests for target nodes.

One endpoint, many nodes: the client dials an endpoint (a control plane) and names the
target nodes in request metadata; the endpoint forwards and answers per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from ..api import API_PORT
from ..api.machine_pb2_grpc import MachineServiceStub
from ..api.resource_pb2_grpc import ResourceServiceStub
from ..errors import BasaltError

if TYPE_CHECKING:
    from .config import Context

#: Metadata key with the comma-separated target nodes of a request.
NODES_METADATA = "nodes"
#: Server name in the self-signed certificate of maintenance mode.
MAINTENANCE_SERVER_NAME = "basalt-maintenance"
MAX_MESSAGE = 32 * 1024 * 1024
#: Initial metadata a node sends when it accepts a client-streaming call (see upload).
UPLOAD_READY = (("basalt-upload", "ready"),)

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 0),
]


class APIError(BasaltError):
    """A request to a node failed; ``code`` is the gRPC status code name."""

    def __init__(self, message: str, *, code: str, node: str = "", hint: str | None = None):
        super().__init__(message, hint=hint)
        self.code = code
        self.node = node


_HINTS = {
    "UNAVAILABLE": "is the node up and the endpoint right? (basaltctl config info)",
    "PERMISSION_DENIED": "your client certificate lacks a role for this; ask an admin "
    "for one with 'basaltctl config new --roles ...'",
    "UNAUTHENTICATED": "check the client config's certificate and CA",
    "DEADLINE_EXCEEDED": "the node did not answer in time; try again or raise --timeout",
}


def rpc_error(exc: grpc.aio.AioRpcError | grpc.RpcError, node: str = "") -> APIError:
    """Turn a gRPC error into an APIError with a hint."""
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    prefix = f"{node}: " if node else ""
    return APIError(f"{prefix}{name}: {details}", code=name, node=node, hint=_HINTS.get(name))


def split_endpoint(endpoint: str, default_port: int = API_PORT) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` -> (host, port)."""
    if endpoint.startswith("["):
        host, _, rest = endpoint[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if endpoint.count(":") == 1:
        host, port = endpoint.split(":")
        return host, int(port)
    return endpoint, default_port


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def upload(
    method: Any,
    requests: AsyncIterable[Any],
    *,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float | None = None,
) -> Any:
    """Call a client-streaming RPC so that a refusal arrives as the server's status.

    The server sends ``UPLOAD_READY`` as initial metadata once the caller is authenticated
    and allowed (see ``basalt.machined.api.dispatch``); only then is data written. A
    refused call ends without it and is never written to; a write that fails because the
    server already answered stops the upload, and the server's answer is read. Without
    this the grpc aio client can replace the server's status with INTERNAL "Failed
    execute_batch" (grpc/grpc#36066).
    """
    call = method(metadata=tuple(metadata), timeout=timeout)
    accepted = await call.initial_metadata()
    if UPLOAD_READY[0] not in tuple(accepted or ()):
        return await call  # refused (or a node too old to say): its status is the answer
    async for request in requests:
        if call.done():
            break
        try:
            await call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            break
    if not call.done():
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.done_writing()
    return await call


class Client:
    """A connection to one endpoint. Use :meth:`connect`, then the stubs; close when done."""

    def __init__(self, channel: grpc.aio.Channel, endpoint: str, nodes: Sequence[str] = ()):
        self.channel = channel
        self.endpoint = endpoint
        self.nodes = list(nodes)
        self.machine = MachineServiceStub(channel)
        self.resources = ResourceServiceStub(channel)

    @classmethod
    async def connect(
        cls,
        endpoint: str,
        *,
        ca: str | None = None,
        crt: str | None = None,
        key: str | None = None,
        nodes: Sequence[str] = (),
        insecure: bool = False,
    ) -> Client:
        """A client for ``endpoint``.

        With ``insecure`` (maintenance mode), the node's self-signed certificate is taken
        on first use and no client certificate is sent: only use it for nodes you are
        installing on a network you trust.
        """
        host, port = split_endpoint(endpoint)
        options = list(CHANNEL_OPTIONS)
        if insecure:
            try:
                server_pem = await asyncio.to_thread(
                    ssl.get_server_certificate, (host, port), timeout=10
                )
            except OSError as exc:
                raise APIError(
                    f"{endpoint}: cannot reach the maintenance API: {exc}",
                    code="UNAVAILABLE",
                    node=endpoint,
                    hint=_HINTS["UNAVAILABLE"],
                ) from None
            credentials = grpc.ssl_channel_credentials(root_certificates=server_pem.encode())
            options.append(("grpc.ssl_target_name_override", MAINTENANCE_SERVER_NAME))
        else:
            if not (ca and crt and key):
                raise BasaltError(
                    "no client certificate: the client config's context lacks ca, crt or key",
                    hint="use 'basaltctl --basaltconfig FILE' or '--insecure' for maintenance mode",
                )
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca.encode(),
                private_key=key.encode(),
                certificate_chain=crt.encode(),
            )
        channel = grpc.aio.secure_channel(_target(host, port), credentials, options=options)
        return cls(channel, endpoint, nodes)

    @classmethod
    async def from_context(
        cls,
        context: Context,
        *,
        endpoints: Sequence[str] = (),
        nodes: Sequence[str] = (),
        insecure: bool = False,
    ) -> Client:
        chosen = list(endpoints) or context.endpoints
        if not chosen:
            raise BasaltError(
                "no endpoint: pass -e/--endpoints or set one with 'basaltctl config endpoint'"
            )
        return await cls.connect(
            chosen[0],
            ca=context.ca,
            crt=context.crt,
            key=context.key,
            nodes=list(nodes) or context.nodes,
            insecure=insecure,
        )

    def metadata(self, nodes: Sequence[str] | None = None) -> tuple[tuple[str, str], ...]:
        """Request metadata naming the target nodes (none: the endpoint answers itself)."""
        targets = self.nodes if nodes is None else list(nodes)
        return ((NODES_METADATA, ",".join(targets)),) if targets else ()

    async def close(self) -> None:
        await self.channel.close(None)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
