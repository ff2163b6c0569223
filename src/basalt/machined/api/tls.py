"""Server credentials: self-signed for maintenance mode, OS-CA mTLS for normal mode."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from basalt.machinery.client.client import MAINTENANCE_SERVER_NAME
from basalt.machinery.pki import (
    CertificateAndKey,
    generate_private_key,
    private_key_pem,
    san_entries,
    self_signed,
)


def self_signed_maintenance_certificate(address: str) -> CertificateAndKey:
    """A throw-away certificate for maintenance mode; clients take it on first use."""
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MAINTENANCE_SERVER_NAME)])
    sans = san_entries([MAINTENANCE_SERVER_NAME, address])
    cert = (
        self_signed(key, name, dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAndKey(
        cert.public_bytes(serialization.Encoding.PEM).decode(), private_key_pem(key)
    )


def maintenance_credentials(address: str) -> grpc.ServerCredentials:
    pair = self_signed_maintenance_certificate(address)
    assert pair.key is not None
    return grpc.ssl_server_credentials([(pair.key.encode(), pair.crt.encode())])


def _configuration(ca: str, server: CertificateAndKey) -> grpc.ServerCertificateConfiguration:
    assert server.key is not None
    return grpc.ssl_server_certificate_configuration(
        [(server.key.encode(), server.crt.encode())], root_certificates=ca.encode()
    )


def mtls_credentials(
    current: Callable[[], tuple[str, CertificateAndKey]],
    *,
    require_client_certificate: bool = True,
) -> grpc.ServerCredentials:
    """TLS with the node's certificate (mTLS against the OS CA unless told otherwise).

    ``current`` gives the CA certificates trusted for clients (a PEM bundle: the OS CA
    and the config's ``acceptedCAs``) and the server certificate. A renewed certificate
    or a changed bundle is picked up at the next handshake, without a restart.
    """
    ca, server = current()
    served = [(ca, server)]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        ca_now, server_now = current()
        ca_then, server_then = served[0]
        if server_now.crt == server_then.crt and ca_now == ca_then:
            return None
        served[0] = (ca_now, server_now)
        return _configuration(ca_now, server_now)

    return grpc.dynamic_ssl_server_credentials(
        _configuration(ca, server),
        fetch,  # type: ignore[arg-type]  # None means "keep the current one" (grpc docs)
        require_client_authentication=require_client_certificate,
    )
