"""``basalt.fleet=https://HOST:PORT/?token=...&ca=sha256:...``: where a machine's fleet is.

The same text is the kernel argument (a machine in maintenance mode enrols before it has
any config) and the ``url`` of a ``FleetConfig`` document. ``ca`` pins the fleet's CA by
the SHA-256 of its DER encoding, so the first contact needs no trust store.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ..errors import BasaltError, ErrorKind

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class FleetURLError(BasaltError):
    """A fleet URL that cannot be used; the message names the part that is wrong."""

    kind = ErrorKind.INVALID_ARGUMENT


@dataclass(frozen=True)
class FleetURL:
    host: str
    port: int
    token: str
    ca_sha256: str

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.base}/?token={self.token}&ca=sha256:{self.ca_sha256}"

    def redacted(self) -> str:
        """For logs and events: the join token is a secret."""
        return f"{self.base}/?token=***&ca=sha256:{self.ca_sha256}"


def ca_fingerprint(ca_pem: str) -> str:
    """The hex SHA-256 of a PEM certificate's DER encoding (what ``ca=sha256:`` pins)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(ca_pem.encode()).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def parse_fleet_url(text: str, where: str = "basalt.fleet") -> FleetURL:
    """Parse and check ``text``; ``where`` names its source in errors (an argument, a field)."""
    hint = "the fleet prints the URL with 'basaltctl fleet token create'"
    parts = urlsplit(text.strip())
    if parts.scheme != "https":
        raise FleetURLError(f"{where}: the fleet URL must start with https://", hint=hint)
    try:
        port = parts.port
    except ValueError:
        raise FleetURLError(f"{where}: the port is not a number", hint=hint) from None
    if not parts.hostname:
        raise FleetURLError(f"{where}: the fleet URL names no host", hint=hint)
    query = parse_qs(parts.query)
    tokens = query.get("token", [])
    if len(tokens) != 1 or not tokens[0]:
        raise FleetURLError(f"{where}: the fleet URL needs exactly one token=", hint=hint)
    cas = query.get("ca", [])
    if len(cas) != 1 or not cas[0].startswith("sha256:"):
        raise FleetURLError(
            f"{where}: the fleet URL needs ca=sha256:HEX (the fleet CA's fingerprint)", hint=hint
        )
    fingerprint = cas[0].removeprefix("sha256:").lower()
    if not _HEX64.match(fingerprint):
        raise FleetURLError(f"{where}: ca=sha256: must be 64 hex digits", hint=hint)
    return FleetURL(parts.hostname, port or 443, tokens[0], fingerprint)
