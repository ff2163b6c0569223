"""How the health checks reach nodes: a :class:`NodeCaller` sends one request to one
node. The CLI's (:class:`ClientCaller`) goes through its endpoint, which forwards; a
node's (``basalt.machined.api.cluster_health``) dials its peers itself. Both are
:class:`ChannelCaller` objects: a channel and metadata per node, gRPC failures as
:class:`NodeCallError`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from google.protobuf.message import Message

from ..errors import BasaltError, ErrorKind

if TYPE_CHECKING:
    import grpc.aio

    from ..client.client import Client

M = TypeVar("M", bound=Message)


class NodeCallError(BasaltError):
    """A request to one node failed (unreachable, refused, or the node's own error)."""

    kind = ErrorKind.UNAVAILABLE

    def __init__(self, node: str, code: str, message: str) -> None:
        super().__init__(f"{node or 'endpoint'}: {code}: {message}")
        self.node = node
        self.code = code
        self.detail = message


class NodeCaller(Protocol):
    """How the checks reach node ``node`` ('' : the endpoint or this node itself).

    ``method`` is the full gRPC path; the answer is parsed as ``answer``. A request that
    fails as a whole raises :class:`NodeCallError`; a node's error inside the answer is
    left in its metadata (:func:`first_message` raises it).
    """

    async def unary(
        self, node: str, method: str, request: Message, answer: type[M], timeout: float
    ) -> M: ...

    async def stream(
        self, node: str, method: str, request: Message, answer: type[M], timeout: float
    ) -> list[M]: ...


class ChannelCaller:
    """A :class:`NodeCaller` over gRPC channels: subclasses say which channel reaches a
    node and with which metadata; gRPC failures become :class:`NodeCallError`."""

    def channel(self, node: str) -> grpc.aio.Channel:
        raise NotImplementedError

    def metadata(self, node: str) -> tuple[tuple[str, str], ...]:
        raise NotImplementedError

    async def unary(
        self, node: str, method: str, request: Message, answer: type[M], timeout: float
    ) -> M:
        import grpc.aio

        call = self.channel(node).unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=answer.FromString,
        )
        try:
            result: M = await call(request, metadata=self.metadata(node), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise NodeCallError(node, exc.code().name, exc.details() or "") from None
        return result

    async def stream(
        self, node: str, method: str, request: Message, answer: type[M], timeout: float
    ) -> list[M]:
        import grpc.aio

        call = self.channel(node).unary_stream(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=answer.FromString,
        )
        try:
            return [m async for m in call(request, metadata=self.metadata(node), timeout=timeout)]
        except grpc.aio.AioRpcError as exc:
            raise NodeCallError(node, exc.code().name, exc.details() or "") from None


class ClientCaller(ChannelCaller):
    """Over the CLI's client: every request goes to the endpoint, naming the target node
    in metadata (the endpoint forwards it)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def channel(self, node: str) -> grpc.aio.Channel:
        return self.client.channel

    def metadata(self, node: str) -> tuple[tuple[str, str], ...]:
        return self.client.metadata([node] if node else [])


def code_name(code: int) -> str:
    """The name of a gRPC status code given as its number."""
    import grpc

    return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")


def first_message(node: str, messages: Sequence[Any]) -> Any:
    """The node's one answer, or its error raised as :class:`NodeCallError`."""
    if not messages:
        raise NodeCallError(node, "UNKNOWN", "the answer carried no message")
    meta = messages[0].metadata
    if meta.error:
        raise NodeCallError(node, code_name(meta.code), meta.error)
    return messages[0]
