"""Forwarding: one endpoint, many nodes.

A request that names target nodes is sent by the endpoint (a control plane) to each
target with the endpoint's own ``os:impersonator`` client certificate; the caller's
roles, checked here first, travel in metadata that targets accept only from such a
certificate. Answers are merged on the wire (see :mod:`.wire`), so the proxy needs no
knowledge of the methods it forwards. A node that fails contributes an error answer;
the others' answers still arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from basalt.machinery.api import API_PORT
from basalt.machinery.client.client import CHANNEL_OPTIONS
from basalt.machinery.errors import BasaltError
from basalt.machinery.pki import CertificateAndKey

from . import wire
from .auth import NODE_METADATA, ROLES_METADATA, Principal
from .dispatch import Check, Handler, decoder, read_one
from .errors import details_for, status_for

if TYPE_CHECKING:
    from ..node import Node

STREAM_BUFFER = 64
#: Channels kept open to other nodes at most (least recently used are closed first).
MAX_CHANNELS = 64


class UnknownTargetError(ValueError):
    """A ``-n`` target that is not a member of the cluster: refused, never dialled."""


class Proxy:
    """Channels to other nodes, made with this node's client certificate.

    Targets resolve through ``resolve`` (members only); channels are cached by the address
    they dial, closed when that address is no longer a member's (``allowed``) or when more
    than :data:`MAX_CHANNELS` are open, and made again when the certificate changes.
    """

    def __init__(
        self,
        credentials: Callable[[], tuple[str, CertificateAndKey] | None],
        resolve: Callable[[str], str] = lambda name: name,
        allowed: Callable[[], set[str]] | None = None,
    ) -> None:
        self._credentials = credentials
        self._resolve = resolve
        self._allowed = allowed
        self._channels: OrderedDict[str, tuple[int, grpc.aio.Channel]] = OrderedDict()
        self._closing: set[asyncio.Future[None]] = set()

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        closing = asyncio.ensure_future(channel.close(None))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def _evict(self) -> None:
        """Close channels to addresses that are no longer members, and the least
        recently used beyond :data:`MAX_CHANNELS`."""
        allowed = self._allowed() if self._allowed is not None else None
        gone = [a for a in self._channels if allowed is not None and a not in allowed]
        while len(self._channels) - len(gone) > MAX_CHANNELS:
            oldest = next(a for a in self._channels if a not in gone)
            gone.append(oldest)
        for address in gone:
            _, channel = self._channels.pop(address)
            self._close_later(channel)

    @property
    def open_channels(self) -> int:
        return len(self._channels)

    def channel(self, target: str) -> grpc.aio.Channel:
        """The channel to ``target`` (a member), made or cached."""
        creds = self._credentials()
        if creds is None:
            raise PermissionError("no client certificate to forward with")
        ca, client = creds
        key = hash((id(client), ca))  # a new certificate or trust bundle: a new channel
        host = self._resolve(target)  # raises UnknownTargetError for non-members
        port = API_PORT
        self._evict()
        cached = self._channels.get(host)
        if cached is not None and cached[0] == key:
            self._channels.move_to_end(host)
            return cached[1]
        if cached is not None:
            self._close_later(cached[1])
        assert client.key is not None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.encode(),
            private_key=client.key.encode(),
            certificate_chain=client.crt.encode(),
        )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        channel = grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self._channels[host] = (key, channel)
        self._evict()
        return channel

    @staticmethod
    def metadata(principal: Principal, target: str) -> tuple[tuple[str, str], ...]:
        """What tells ``target`` whom a request is for: the caller's roles and name."""
        roles = ",".join(sorted(r.value for r in principal.roles))
        return (
            (ROLES_METADATA, roles),
            (NODE_METADATA, target),
            ("basalt-subject", principal.subject),
        )

    async def close(self) -> None:
        for _, channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()

    def handler(self, method: str, handler: Handler, nodes: list[str], check: Check) -> Any:
        """A raw-bytes handler that forwards ``method`` to ``nodes`` and merges answers."""

        async def authorize(context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
            principal = await check(context)
            if principal.forwarded_by:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, "a forwarded request cannot be forwarded"
                )
            if self._credentials() is None:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "this node cannot forward requests (only control planes hold a client "
                    "certificate); use a control plane as the endpoint, or this node without -n",
                )
            return principal

        if handler.request_streaming:

            async def unsupported(
                requests: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                await authorize(context)  # the caller's roles first, like every other call
                await context.abort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    "client-streaming requests cannot be forwarded; address the node directly",
                )

            if handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(unsupported)
            return grpc.stream_unary_rpc_method_handler(unsupported)

        # The request is read only after the caller's roles passed, and held to the
        # method's size limit (see dispatch.wrap).
        decode = decoder(method, None)

        async def one(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            try:
                data: bytes = await read_one(requests, decode)
            except BasaltError as exc:
                await context.abort(status_for(exc), details_for(exc))
                raise
            return data

        if handler.response_streaming:

            async def unary_stream(
                requests: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[bytes]:
                principal = await authorize(context)
                request = await one(requests, context)
                async for item in self._stream(method, request, nodes, principal, context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(unary_stream)

        async def unary_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            principal = await authorize(context)
            request = await one(requests, context)
            timeout = context.time_remaining()
            answers = await asyncio.gather(
                *(self._unary(method, request, n, principal, timeout) for n in nodes)
            )
            return b"".join(answers)

        return grpc.stream_unary_rpc_method_handler(unary_unary)

    async def _unary(
        self, method: str, request: bytes, target: str, principal: Principal, timeout: float | None
    ) -> bytes:
        try:
            call = self.channel(target).unary_unary(method, None, None)
            answer: bytes = await call(
                request, metadata=self.metadata(principal, target), timeout=timeout
            )
            return answer
        except grpc.aio.AioRpcError as exc:
            return wire.unary_error(target, exc.details() or "", exc.code().value[0])
        except UnknownTargetError as exc:
            return wire.unary_error(target, str(exc), grpc.StatusCode.NOT_FOUND.value[0])
        except (PermissionError, ValueError, OSError) as exc:
            return wire.unary_error(target, str(exc), grpc.StatusCode.UNAVAILABLE.value[0])

    async def _stream(
        self,
        method: str,
        request: bytes,
        nodes: list[str],
        principal: Principal,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(STREAM_BUFFER)
        timeout = context.time_remaining()

        async def pump(target: str) -> None:
            try:
                call = self.channel(target).unary_stream(method, None, None)
                async for message in call(
                    request, metadata=self.metadata(principal, target), timeout=timeout
                ):
                    await queue.put(message)
            except grpc.aio.AioRpcError as exc:
                await queue.put(wire.stream_error(target, exc.details() or "", exc.code().value[0]))
            except UnknownTargetError as exc:
                await queue.put(
                    wire.stream_error(target, str(exc), grpc.StatusCode.NOT_FOUND.value[0])
                )
            except (PermissionError, ValueError, OSError) as exc:
                await queue.put(
                    wire.stream_error(target, str(exc), grpc.StatusCode.UNAVAILABLE.value[0])
                )
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(n)) for n in nodes]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks, return_exceptions=True)


def forwarding_credentials(node: Node) -> tuple[str, CertificateAndKey] | None:
    """What a node dials its peers with: the CAs it trusts now (the OS CA, ``acceptedCAs``;
    both sides of a CA rotation) and its client certificate; None on nodes without one
    (only control planes hold it)."""
    from ..certificates import trust_bundle

    identity = node.identity
    if identity is None or identity.client is None:
        return None
    return trust_bundle(node), identity.client


def member_resolver(node: Node, *, empty_is_self: bool = False) -> Callable[[str], str]:
    """Target names -> addresses: this node's own name or address, a member's id or host
    name (its first address), or a member's address. Anything else is refused before it
    is dialled (:class:`UnknownTargetError`): forwarding reaches members only. With
    ``empty_is_self``, an empty name is this node too."""

    def resolve(name: str) -> str:
        wanted = name.strip()
        if wanted in (node.address, node.hostname) or (empty_is_self and not wanted):
            return node.address
        for member_id, member in list(node.members.items()):
            addresses = [str(a) for a in member.addresses]
            if wanted in (member_id, member.hostname) and addresses:
                return addresses[0]
            if wanted in addresses:
                return wanted
        raise UnknownTargetError(
            f"{name} is not a member of this cluster; 'basaltctl get members' lists them"
        )

    return resolve
