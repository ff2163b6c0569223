"""Every request passes here: authentication, the role table, maintenance restrictions,
forwarding to other nodes, and the mapping of errors to status codes.

Servicers are registered through their generated ``add_*_to_server`` functions into a
capture object, so the dispatcher owns every method handler and wraps each one. A
servicer may be registered deferred: its methods are known (from the generated base
class, which imports nothing) and refused or routed at once, and the servicer itself,
with every module it imports, is built when one of its methods is first served (or
when :meth:`Deferred.build` is called ahead of that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from basalt.machinery.client.client import UPLOAD_READY
from basalt.machinery.errors import BasaltError, ErrorKind
from basalt.machinery.roles import MAINTENANCE_RPCS, Role, allowed_roles, is_allowed

from .auth import AuthenticationError, Principal, authenticate, current_principal
from .errors import InvalidRequestError, details_for, status_for

log = logging.getLogger(__name__)

Check = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[Principal]]
#: A method handler; its behaviours are called as the aio server calls them (the stubs
#: type them for the synchronous server).
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
MAINTENANCE_PRINCIPAL = Principal(frozenset(), maintenance=True)
#: How long a refused upload is read on before its status is sent.
DRAIN_SECONDS = 30.0


class _Capture:
    """Stands in for a server in ``add_*Servicer_to_server`` to collect its handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler


class Deferred:
    """A servicer built on first use: ``make`` runs once, whichever thread asks first."""

    def __init__(self, add_to_server: Callable[[Any, Any], None], make: Callable[[], Any]) -> None:
        self._add_to_server = add_to_server
        self._make = make
        self._lock = threading.Lock()
        self._handlers: dict[str, Handler] | None = None

    @property
    def built(self) -> bool:
        return self._handlers is not None

    def build(self) -> dict[str, Handler]:
        """The servicer's method handlers, building it (and importing its modules) once."""
        with self._lock:
            if self._handlers is None:
                capture = _Capture()
                self._add_to_server(self._make(), capture)
                self._handlers = capture.handlers
            return self._handlers


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


async def _abort_for(exc: BasaltError, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(status_for(exc), details_for(exc))


async def _drain(requests: AsyncIterator[Any]) -> None:
    """Read what the client still sends before refusing an upload mid-stream.

    A client still writing when the status arrives may lose that status to its own failed
    write (grpc/grpc#36066), so the refusal waits for the client to finish, for at most
    ``DRAIN_SECONDS``.
    """

    async def consume() -> None:
        async for _ in requests:
            pass

    with contextlib.suppress(asyncio.TimeoutError, grpc.RpcError, BasaltError):
        await asyncio.wait_for(consume(), DRAIN_SECONDS)


class RequestTooLargeError(BasaltError):
    """A request message is larger than its method takes (:data:`REQUEST_LIMITS`)."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


_SERVICE = "/basalt.api.v1alpha1.MachineService/"
#: The largest request message each method takes (for a client stream: each message);
#: anything else takes :data:`DEFAULT_REQUEST_LIMIT`. The server refuses larger messages
#: before they are decoded, and reads none before the caller's roles are checked.
REQUEST_LIMITS: dict[str, int] = {
    _SERVICE + "ApplyConfiguration": 2 * 1024 * 1024,  # a config is at most 1 MiB
    _SERVICE + "Upgrade": 1024 * 1024,  # clients send 256 KiB chunks
    _SERVICE + "ImageImport": 1024 * 1024,
    _SERVICE + "EtcdRecover": 1024 * 1024,
}
DEFAULT_REQUEST_LIMIT = 64 * 1024
#: What the server's transport accepts at all (the largest limit, with room to spare).
MAX_REQUEST = 4 * 1024 * 1024


def request_limit(method: str) -> int:
    return REQUEST_LIMITS.get(method, DEFAULT_REQUEST_LIMIT)


def decoder(method: str, deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """Raw request bytes -> the request, refused (RequestTooLargeError) above the
    method's limit and (InvalidRequestError) when they do not decode."""
    limit = request_limit(method)

    def decode(data: bytes) -> Any:
        if len(data) > limit:
            raise RequestTooLargeError(
                f"{_short(method)}: a request message of {len(data)} bytes is over this "
                f"method's limit of {limit} bytes",
                hint="send smaller messages (uploads in chunks of at most 256 KiB)",
            )
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except (DecodeError, ValueError) as exc:
            raise InvalidRequestError(
                f"{_short(method)}: the request does not decode: {exc}"
            ) from None

    return decode


async def read_one(requests: AsyncIterator[bytes], decode: Callable[[bytes], Any]) -> Any:
    """The single message of a unary request, read only now (after the role check)."""
    async for data in requests:
        return decode(data)
    raise InvalidRequestError("the request carried no message")


async def _decoded(requests: AsyncIterator[bytes], decode: Callable[[bytes], Any]) -> Any:
    async for data in requests:
        yield decode(data)


def wrap(handler: Handler, check: Check, method: str = "") -> Handler:
    """``handler`` with ``check`` run first and BasaltErrors turned into status codes.

    Every handler reads its requests as a stream of raw messages (a unary call is a stream
    of one on the wire): nothing is read before ``check`` passed, and each message is
    held to the method's size limit before it is decoded.
    """
    decode = decoder(method, handler.request_deserializer)
    serialize = handler.response_serializer
    if not handler.request_streaming and not handler.response_streaming:
        unary: Any = handler.unary_unary

        async def unary_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = current_principal.set(await check(context))
            try:
                return await unary(await read_one(requests, decode), context)
            except BasaltError as exc:
                await _abort_for(exc, context)
            finally:
                current_principal.reset(token)

        return grpc.stream_unary_rpc_method_handler(unary_unary, None, serialize)
    if not handler.request_streaming:
        stream: Any = handler.unary_stream

        async def unary_stream(
            requests: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            current_principal.set(await check(context))
            try:
                request = await read_one(requests, decode)
                async for item in stream(request, context):
                    yield item
            except BasaltError as exc:
                await _abort_for(exc, context)

        return grpc.stream_stream_rpc_method_handler(unary_stream, None, serialize)
    if not handler.response_streaming:
        client_stream: Any = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            current_principal.set(await check(context))
            # Tells an uploading client that it may send (basalt.machinery.client.upload).
            await context.send_initial_metadata(UPLOAD_READY)
            try:
                return await client_stream(_decoded(requests, decode), context)
            except BasaltError as exc:
                await _drain(requests)
                await _abort_for(exc, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)
    bidi: Any = handler.stream_stream

    async def stream_stream(
        requests: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        current_principal.set(await check(context))
        try:
            async for item in bidi(_decoded(requests, decode), context):
                yield item
        except BasaltError as exc:
            await _abort_for(exc, context)

    return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)


def denied(handler: Handler, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same shape that refuses every call (reading nothing)."""

    async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        await context.abort(code, message)
        raise AssertionError("abort returned")

    return wrap(handler, refuse)


class Dispatcher(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Routes each call to its (wrapped) handler, or to the proxy when it names nodes."""

    def __init__(
        self,
        *,
        maintenance: bool,
        rbac_enabled: Callable[[], bool] = lambda: True,
        forward: Callable[[str, Handler, list[str], Check], Any] | None = None,
    ) -> None:
        self.maintenance = maintenance
        self._rbac_enabled = rbac_enabled
        self._forward = forward
        self._handlers: dict[str, Handler] = {}
        #: Methods whose servicer is not built yet (their handlers above are its shapes).
        self._deferred: dict[str, Deferred] = {}

    def register(self, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        capture = _Capture()
        add_to_server(servicer, capture)
        self._handlers.update(capture.handlers)

    def register_deferred(
        self, add_to_server: Callable[[Any, Any], None], interface: Any, make: Callable[[], Any]
    ) -> Deferred:
        """Register the methods of the servicer ``make`` builds, without building it.

        ``interface`` is an instance of the generated base servicer: its handlers carry
        every method's shape (streaming, request decoder, response encoder), which is all
        a refusal needs. The servicer is built when a call is first let through.
        """
        shapes = _Capture()
        add_to_server(interface, shapes)
        deferred = Deferred(add_to_server, make)
        self._handlers.update(shapes.handlers)
        self._deferred.update(dict.fromkeys(shapes.handlers, deferred))
        return deferred

    def _served(self, method: str) -> Handler:
        """The handler that serves ``method``, its servicer built now if it was deferred."""
        deferred = self._deferred.get(method)
        if deferred is not None:
            built = deferred.build()
            self._handlers.update(built)
            for name in built:
                self._deferred.pop(name, None)
        return self._handlers[method]

    @property
    def methods(self) -> list[str]:
        return sorted(self._handlers)

    def checker(self, method: str, metadata: dict[str, str]) -> Check:
        """The authentication + role check for ``method``."""

        async def check(context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
            try:
                principal = authenticate(context.auth_context(), metadata)  # type: ignore[arg-type]
            except AuthenticationError as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
                raise
            if not self._rbac_enabled():
                principal = Principal(
                    frozenset({Role.ADMIN}),
                    subject=principal.subject,
                    forwarded_by=principal.forwarded_by,
                    node_name=principal.node_name,
                )
            if not is_allowed(method, principal.roles):
                need = ", ".join(sorted(r.value for r in allowed_roles(method)))
                have = ", ".join(sorted(r.value for r in principal.roles)) or "no role"
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{_short(method)} needs one of the roles {need}; the client has {have}",
                )
            return principal

        return check

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            return None
        metadata = {
            k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)
        }
        if self.maintenance:
            if method not in MAINTENANCE_RPCS:
                return denied(
                    handler,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"node is in maintenance mode: only version, disks and apply-config are "
                    f"served until a config is applied ({_short(method)} is not)",
                )
            if metadata.get("nodes"):
                return denied(
                    handler,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "node is in maintenance mode and does not forward requests; "
                    "address each node directly with -n NODE --insecure",
                )

            async def maintenance(context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
                return MAINTENANCE_PRINCIPAL

            return wrap(self._served(method), maintenance, method)
        check = self.checker(method, metadata)
        nodes = [n.strip() for n in metadata.get("nodes", "").split(",") if n.strip()]
        if nodes and self._forward is not None:
            return self._forward(method, handler, nodes, check)
        return wrap(self._served(method), check, method)
