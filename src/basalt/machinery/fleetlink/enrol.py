"""Enrolment: a machine presents a join token once and gets a certificate for its own key.

The first contact pins the fleet's CA by fingerprint (``ca=sha256:`` of the fleet URL):
``GET /v1/ca`` is read without a trust store and refused unless its hash matches; every
later request verifies the fleet against that CA. The machine's key never leaves it: the
fleet signs a CSR and binds the certificate to the machine's UUID. Blocking (urllib);
callers run it in a thread.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import BasaltError, ErrorKind
from ..fileio import write_atomic
from .url import FleetURL, ca_fingerprint

TIMEOUT = 15.0


class EnrolmentError(BasaltError):
    """The fleet refused the machine (token used up, expired, revoked; machine removed)."""

    kind = ErrorKind.PERMISSION_DENIED


class FleetUnreachable(BasaltError):
    """The fleet did not answer; try again later."""

    kind = ErrorKind.UNAVAILABLE


@dataclass(frozen=True)
class LinkIdentity:
    """What enrolment leaves on the machine: its key and certificate, the fleet's CA, and
    where the fleet's link service listens."""

    machine_uuid: str
    key: str
    crt: str
    ca: str
    link_port: int

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        data = {
            "machine_uuid": self.machine_uuid,
            "key": self.key,
            "crt": self.crt,
            "ca": self.ca,
            "link_port": self.link_port,
        }
        write_atomic(directory / "identity.json", json.dumps(data).encode(), mode=0o600)

    @classmethod
    def load(cls, directory: Path) -> LinkIdentity | None:
        try:
            data = json.loads((directory / "identity.json").read_text())
            return cls(
                str(data["machine_uuid"]),
                str(data["key"]),
                str(data["crt"]),
                str(data["ca"]),
                int(data["link_port"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _unverified() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def pinned_context(ca_pem: str) -> ssl.SSLContext:
    """Verifies the fleet's chain against its CA. Host names are not checked: the CA is
    the fleet's own (pinned by fingerprint) and a machine behind NAT may know the fleet by
    an address the fleet's certificate does not name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=ca_pem)
    return context


def _request(url: str, context: ssl.SSLContext, body: dict[str, object] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as answer:
            result: bytes = answer.read(1 << 20)
            return result
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read(1 << 16)).get("detail", "")
        except (ValueError, AttributeError):
            detail = ""
        message = detail if isinstance(detail, str) and detail else exc.reason
        if exc.code in (400, 401, 403, 404, 409, 410, 422):
            raise EnrolmentError(f"the fleet refused enrolment: {message}") from None
        raise FleetUnreachable(f"the fleet answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FleetUnreachable(f"cannot reach the fleet at {url}: {reason}") from None


def fetch_pinned_ca(url: FleetURL) -> str:
    """The fleet's CA, refused unless its fingerprint is the one the URL pins."""
    pem = _request(f"{url.base}/v1/ca", _unverified()).decode()
    try:
        fingerprint = ca_fingerprint(pem)
    except ValueError:
        raise EnrolmentError(f"{url.base}/v1/ca did not return a certificate") from None
    if fingerprint != url.ca_sha256:
        raise EnrolmentError(
            f"the fleet at {url.base} presents a CA with fingerprint sha256:{fingerprint}, "
            f"not the sha256:{url.ca_sha256} of the fleet URL",
            hint="is the URL for this fleet? a fleet that made a new CA needs a new URL",
        )
    return pem


def enrol(url: FleetURL, machine_uuid: str, hostname: str = "") -> LinkIdentity:
    """Present the join token once; returns the machine's new link identity."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from ..pki import generate_private_key, private_key_pem

    ca = fetch_pinned_ca(url)
    key = generate_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, machine_uuid)]))
        .sign(key, hashes.SHA256())
    )
    body: dict[str, object] = {
        "token": url.token,
        "machine_uuid": machine_uuid,
        "hostname": hostname,
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
    }
    answer = json.loads(_request(f"{url.base}/v1/enrol", pinned_context(ca), body))
    return LinkIdentity(
        machine_uuid=machine_uuid,
        key=private_key_pem(key),
        crt=str(answer["certificate"]),
        ca=ca,
        link_port=int(answer["link_port"]),
    )
