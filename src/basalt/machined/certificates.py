"""Get the node's certificates at boot and keep them fresh.

They are issued again, without a reboot, when the config's OS CA changes (a step of
``rotate-ca``); :func:`trust_bundle` is what the node trusts meanwhile: the OS CA, the
config's ``acceptedCAs`` and the CA its current certificate came from.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc

from basalt.machinery.config import ClusterConfig
from basalt.machinery.pki import CertificateAndKey

from .identity import NodeIdentity, node_sans, request_from_trust_service, sign_locally

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)


#: How often the renewal loop looks for a changed OS CA in the config.
CA_CHECK_INTERVAL = 1.0


def trust_bundle(node: Node) -> str:
    """The CA certificates this node trusts now (PEM, one after the other): for client
    certificates at its API, for peers' server certificates when it dials them."""
    machine = node.machine
    pems = [machine.ca.crt, *machine.accepted_cas] if machine is not None else []
    if node.identity is not None:
        pems.append(node.identity.ca)
    unique = dict.fromkeys(p.strip() + "\n" for p in pems if p.strip())
    return "".join(unique)


def served_chain(node: Node, identity: NodeIdentity) -> CertificateAndKey:
    """The server certificate the API presents: with the config's ``crossSignedCA`` after
    it while the OS CA is rotated (clients that trust only the previous CA verify the
    node through it), once the certificate comes from the config's ``ca``."""
    machine = node.machine
    cross = machine.cross_signed_ca if machine is not None else None
    if not cross or not issued_by_current_ca(node):
        return identity.server
    return CertificateAndKey(
        identity.server.crt.strip() + "\n" + cross.strip() + "\n", identity.server.key
    )


def issued_by_current_ca(node: Node) -> bool:
    """Whether the node's certificate comes from the config's OS CA (false after a
    rotation step changed ``ca``, until it is issued again)."""
    machine, identity = node.machine, node.identity
    if machine is None or identity is None:
        return True
    return identity.ca.strip() == machine.ca.crt.strip()


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
                endpoint, trust_bundle(node), machine.token, node.hostname, sans
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
    retry_after = 0.0
    while True:
        identity = node.identity
        assert identity is not None
        reissue = await _due(node, identity.renew_at(), retry_after)
        try:
            node.identity = await obtain(node)
        except Exception as exc:  # keep the old certificate, try again soon
            log.warning("certificate renewal failed: %s", exc)
            await asyncio.sleep(10)
            continue
        # A worker whose control plane still signs with the old CA asks again soon.
        stale = reissue and not issued_by_current_ca(node)
        retry_after = time.monotonic() + 5.0 if stale else 0.0
        what = "issued again from the new OS CA" if reissue else "renewed"
        node.events.publish("certificate", f"API certificate {what}", actor="machined")
        log.info("API certificate %s", what)


async def _due(node: Node, renew_at: dt.datetime, retry_after: float) -> bool:
    """Wait until the certificate is due for renewal (False) or the config's OS CA no
    longer matches it (True)."""
    while True:
        if not issued_by_current_ca(node) and time.monotonic() >= retry_after:
            return True
        left = (renew_at - dt.datetime.now(dt.UTC)).total_seconds()
        if left <= 0:
            await asyncio.sleep(0.5)  # never spin, whatever the clock says
            return False
        await asyncio.sleep(min(left, CA_CHECK_INTERVAL))
