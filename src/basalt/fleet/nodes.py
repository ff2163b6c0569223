"""Calls to a node's API through its link.

The fleet opens a gRPC channel to the machine's tunnel socket and speaks TLS through it
to the node's API port, as ``basaltctl`` would over the network: a node in maintenance
mode with its self-signed certificate (taken on first use, as ``--insecure`` does), a
configured node with mTLS and a cluster's client certificate.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import grpc.aio

from basalt.machinery.client.client import (
    CHANNEL_OPTIONS,
    MAINTENANCE_SERVER_NAME,
    APIError,
    Client,
)
from basalt.machinery.pki import CertificateAndKey

from .service import FleetError, NotFound


class NotLinked(NotFound):
    """The machine has no link to this fleet right now."""


async def maintenance_certificate(socket: Path) -> str:
    """The self-signed certificate a maintenance API presents, read through the tunnel."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(
                str(socket), ssl=context, server_hostname=MAINTENANCE_SERVER_NAME
            ),
            15,
        )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise APIError(
            f"cannot reach the machine's API through its link: {exc}", code="UNAVAILABLE"
        ) from None
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    if not der:
        raise FleetError("the machine's API presented no certificate")
    return ssl.DER_cert_to_PEM_cert(der)


@asynccontextmanager
async def node_client(
    socket: Path,
    *,
    credentials: CertificateAndKey | None = None,
    ca: str = "",
    server_name: str = "localhost",
) -> AsyncIterator[Client]:
    """A :class:`Client` whose channel runs through ``socket`` (a machine's tunnel)."""
    options = list(CHANNEL_OPTIONS)
    if credentials is None:
        server_pem = await maintenance_certificate(socket)
        channel_credentials = grpc.ssl_channel_credentials(root_certificates=server_pem.encode())
        options.append(("grpc.ssl_target_name_override", MAINTENANCE_SERVER_NAME))
    else:
        assert credentials.key is not None
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.encode(),
            private_key=credentials.key.encode(),
            certificate_chain=credentials.crt.encode(),
        )
        options.append(("grpc.ssl_target_name_override", server_name))
    channel = grpc.aio.secure_channel(f"unix:{socket}", channel_credentials, options=options)
    client = Client(channel, f"unix:{socket}")
    try:
        yield client
    finally:
        await client.close()
