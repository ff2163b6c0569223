"""The node's certificates: an API server certificate, and on control planes a client
certificate for forwarding (``os:impersonator``).

Control planes sign their own with the OS CA key from the config. Workers hold no CA
key: they send a CSR with the join token to a control plane's trust service, which
signs a server-only certificate. Both renew when a third of the lifetime is left.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from basalt.machinery.api import TRUST_PORT, trust_pb2, trust_pb2_grpc
from basalt.machinery.client.client import CHANNEL_OPTIONS, split_endpoint
from basalt.machinery.pki import (
    CertificateAndKey,
    generate_private_key,
    issue_certificate,
    load_certificate,
    private_key_pem,
    san_entries,
)
from basalt.machinery.roles import Role

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeIdentity:
    ca: str
    server: CertificateAndKey
    #: The forwarding certificate; control planes only.
    client: CertificateAndKey | None
    obtained: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def renew_at(self) -> dt.datetime:
        """Two thirds into the time the certificate has left from when it was obtained.

        (Not from ``not_valid_before``: certificates are back-dated a few minutes for
        clock skew, which must not count as used-up lifetime.)
        """
        cert = load_certificate(self.server.crt)
        remaining = cert.not_valid_after_utc - self.obtained
        return self.obtained + remaining * 2 / 3


def node_sans(address: str, hostname: str, extra: Sequence[str]) -> list[str]:
    names = [address, hostname, "localhost", "127.0.0.1", *extra]
    return list(dict.fromkeys(n for n in names if n))


def sign_locally(
    os_ca: CertificateAndKey, hostname: str, sans: Sequence[str], validity: dt.timedelta
) -> NodeIdentity:
    """A control plane's identity, signed with the OS CA key it holds."""
    server = issue_certificate(os_ca, hostname, server=True, sans=sans, validity=validity)
    client = issue_certificate(
        os_ca, hostname, organizations=[Role.IMPERSONATOR.value], client=True, validity=validity
    )
    return NodeIdentity(os_ca.crt, server, client)


def certificate_request(hostname: str, sans: Sequence[str]) -> tuple[str, str]:
    """(CSR PEM, key PEM) for a worker's API certificate."""
    key = generate_private_key()
    names = san_entries(sans)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), private_key_pem(key)


async def request_from_trust_service(
    endpoint_host: str, os_ca_crt: str, token: str, hostname: str, sans: Sequence[str]
) -> NodeIdentity:
    """Ask a control plane to sign this worker's certificate; raises grpc errors."""
    csr, key = certificate_request(hostname, sans)
    host, _ = split_endpoint(endpoint_host)
    credentials = grpc.ssl_channel_credentials(root_certificates=os_ca_crt.encode())
    target = f"[{host}]:{TRUST_PORT}" if ":" in host else f"{host}:{TRUST_PORT}"
    async with grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS) as channel:
        stub = trust_pb2_grpc.TrustServiceStub(channel)
        answer = await stub.Certificate(
            trust_pb2.CertificateRequest(csr=csr.encode(), token=token), timeout=10
        )
    return NodeIdentity(answer.ca.decode(), CertificateAndKey(answer.crt.decode(), key), None)


async def wait_until(when: dt.datetime) -> None:
    delay = (when - dt.datetime.now(dt.UTC)).total_seconds()
    if delay > 0:
        await asyncio.sleep(delay)
