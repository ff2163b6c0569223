"""Server credentials: self-signed for maintenance mode, OS-CA mTLS for normal mode.

cryptography is imported only where a certificate is made: a first boot's maintenance
certificate usually comes from the helper forked at PID 1's start
(:mod:`.certificate_helper`), and then PID 1 never imports it before its API opens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from . import certificate_helper
from .certificate_helper import self_signed_maintenance_certificate

if TYPE_CHECKING:
    from basalt.machinery.pki import CertificateAndKey

log = logging.getLogger(__name__)


def maintenance_credentials(address: str) -> grpc.ServerCredentials:
    pair = self_signed_maintenance_certificate(address)
    assert pair.key is not None
    return grpc.ssl_server_credentials([(pair.key.encode(), pair.crt.encode())])


async def prepared_maintenance_credentials(address: str) -> grpc.ServerCredentials:
    """The maintenance credentials from the certificate helper forked at PID 1's start,
    else (no helper, or it failed) made here."""
    helper = certificate_helper.take()
    if helper is not None:
        try:
            crt, key = await asyncio.to_thread(helper.certificate, address)
        except certificate_helper.HelperError as exc:
            log.warning("%s; making the maintenance certificate in machined", exc)
        else:
            return grpc.ssl_server_credentials([(key.encode(), crt.encode())])
    return maintenance_credentials(address)


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
