"""Get the node's certificates at boot and keep them fresh."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc

from basalt.machinery.config import ClusterConfig
from basalt.machinery.pki import CertificateAndKey

from .identity import NodeIdentity, node_sans, request_from_trust_service, sign_locally, wait_until

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)


def trust_endpoint(node: Node) -> str:
    """The control plane a worker asks for certificates: the cluster endpoint's host."""
    assert node.config is not None
    cluster = node.config.first(ClusterConfig)
    assert cluster is not None
    return urlsplit(cluster.control_plane.endpoint).hostname or ""


async def obtain(node: Node) -> NodeIdentity:
    machine = node.machine
    assert machine is not None
    sans = node_sans(node.address, node.hostname, machine.cert_sans)
    if machine.type == "controlplane":
        ca = CertificateAndKey(machine.ca.crt, machine.ca.key)
        return await asyncio.to_thread(
            sign_locally, ca, node.hostname, sans, node.tuning.cert_validity
        )
    endpoint = trust_endpoint(node)
    # A worker asks only for its own names: the trust service refuses names in use by
    # anyone else, and localhost and 127.0.0.1 are every machine's (the control plane's).
    sans = list(dict.fromkeys(n for n in (node.address, node.hostname, *machine.cert_sans) if n))
    backoff = 0.5
    while True:
        try:
            return await request_from_trust_service(
                endpoint, machine.ca.crt, machine.token, node.hostname, sans
            )
        except grpc.aio.AioRpcError as exc:
            message = (
                f"waiting for a certificate from {endpoint}: {exc.code().name}: {exc.details()}"
            )
            node.events.publish("certificate", message, actor="machined")
            log.warning("%s", message)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


async def establish(node: Node) -> None:
    """First certificates (boot waits for them), then a renewal loop in the background."""
    node.identity = await obtain(node)
    node.events.publish("certificate", "API certificate issued", actor="machined")
    node.background(renew_forever(node), name="certificate-renewal")


async def renew_forever(node: Node) -> None:
    while True:
        identity = node.identity
        assert identity is not None
        await wait_until(identity.renew_at())
        await asyncio.sleep(0.5)  # never spin, whatever the clock says
        try:
            node.identity = await obtain(node)
        except Exception as exc:  # keep the old certificate, try again soon
            log.warning("certificate renewal failed: %s", exc)
            await asyncio.sleep(10)
            continue
        node.events.publish("certificate", "API certificate renewed", actor="machined")
