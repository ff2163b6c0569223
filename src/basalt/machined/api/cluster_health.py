"""The ClusterHealth RPC of MachineService (a mixin of MachineServicer).

The node runs the same checks as ``basaltctl health`` (:mod:`basalt.machinery.health`),
reaching the other nodes the way forwarding does (:class:`.proxy.Proxy`): with this
node's ``os:impersonator`` certificate and the caller's roles in metadata, so every
request the checks make is allowed or refused for the caller, never for the node.
Only members are dialled; only control planes hold the certificate this takes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from basalt.machinery.api import machine_pb2
from basalt.machinery.health import (
    ChannelCaller,
    KubeApi,
    NodeCallError,
    Targets,
    discover,
    run_checks,
)

from .auth import Principal, current_principal
from .errors import InvalidRequestError
from .proxy import Proxy, UnknownTargetError, forwarding_credentials, member_resolver

if TYPE_CHECKING:
    from basalt.machinery.pki import CertificateAndKey

    from ..node import Node

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
M = TypeVar("M", bound=Message)
#: The longest a caller may ask the node to keep re-trying (seconds).
MAX_WAIT = 3600.0


class ImpersonatingCaller(ChannelCaller):
    """Sends each request to its node with this node's client certificate, carrying the
    caller's roles (as forwarding does)."""

    def __init__(self, proxy: Proxy, principal: Principal, own_name: str) -> None:
        self.proxy = proxy
        self.principal = principal
        self.own_name = own_name

    def channel(self, node: str) -> grpc.aio.Channel:
        try:
            return self.proxy.channel(node or self.own_name)
        except UnknownTargetError as exc:
            raise NodeCallError(node, "NOT_FOUND", str(exc)) from None
        except (PermissionError, ValueError, OSError) as exc:
            raise NodeCallError(node, "UNAVAILABLE", str(exc)) from None

    def metadata(self, node: str) -> tuple[tuple[str, str], ...]:
        return self.proxy.metadata(self.principal, node or self.own_name)


def kube_client(data: bytes) -> KubeApi:
    """A Kubernetes API client from an admin kubeconfig's bytes (BasaltError if unusable)."""
    from pathlib import Path

    from basalt.machinery.kubernetes import parse_kubeconfig

    from ..kubernetes.client import KubeClient, credentials_from

    source = "the admin kubeconfig"
    parsed = parse_kubeconfig(data.decode(errors="replace"), source)
    return KubeClient(credentials_from(parsed, source, Path("/nonexistent")))


class ClusterHealthMethods:
    node: Node

    def meta(self) -> Any:
        raise NotImplementedError

    def _credentials(self) -> tuple[str, CertificateAndKey] | None:
        return forwarding_credentials(self.node)

    async def ClusterHealth(
        self, request: machine_pb2.ClusterHealthRequest, context: Context
    ) -> AsyncIterator[Any]:
        if not 0 <= request.wait_seconds <= MAX_WAIT:
            raise InvalidRequestError(
                f"wait_seconds {request.wait_seconds:g} is outside 0..{MAX_WAIT:g}",
                hint="ask for at most an hour",
            )
        if self._credentials() is None:
            raise InvalidRequestError(
                "this node cannot run cluster checks: only control planes hold the client "
                "certificate they need to ask the other nodes",
                hint="run 'basaltctl health --server' against a control plane",
            )
        principal = current_principal.get()
        node = self.node
        proxy = Proxy(self._credentials, member_resolver(node, empty_is_self=True), None)
        caller = ImpersonatingCaller(proxy, principal, node.address)
        try:
            targets = Targets(list(request.control_planes), list(request.workers))
            if not targets.all:
                targets = await discover(caller)
            async for step in run_checks(
                caller, targets, wait=request.wait_seconds, kube=kube_client
            ):
                yield machine_pb2.ClusterHealthProgress(
                    metadata=self.meta(),
                    check=step.check,
                    status=step.status,
                    message=step.message,
                    node=step.node,
                )
        finally:
            await proxy.close()
