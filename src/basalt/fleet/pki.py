"""The fleet's own CA: it signs the fleet's server certificates and machines' link
certificates. Kept in the database (its key sealed with the secrets key), so every
replica serves with the same CA; ``ca.crt`` is also written to the data directory."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from sqlalchemy.orm import Session

from basalt.machinery.errors import BasaltError, ErrorKind
from basalt.machinery.pki import CertificateAndKey, generate_ca, issue_certificate

from .db import Setting
from .secretbox import SecretBox

#: The name in every fleet server certificate; machines check it (not the address they
#: dialled, which NAT may change).
SERVER_NAME = "basalt-fleet"
LINK_VALIDITY = dt.timedelta(days=365)
#: What a replica's certificate says it is (a machine's says ``basalt-fleet:machine``):
#: only replicas may open tunnels through each other.
REPLICA_ORGANIZATION = "basalt-fleet:replica"


class CSRError(BasaltError):
    kind = ErrorKind.INVALID_ARGUMENT


def load_or_create_ca(session: Session, box: SecretBox) -> CertificateAndKey:
    crt_row = session.get(Setting, "ca.crt")
    key_row = session.get(Setting, "ca.key")
    if crt_row is not None and key_row is not None:
        key = box.open(key_row.value, "setting ca.key").decode()
        return CertificateAndKey(crt_row.value.decode(), key)
    ca = generate_ca("basalt-fleet-ca", ["basalt-fleet"])
    assert ca.key is not None
    session.add(Setting(name="ca.crt", value=ca.crt.encode(), note="the fleet's CA"))
    session.add(
        Setting(name="ca.key", value=box.seal(ca.key.encode(), "setting ca.key"), note="sealed")
    )
    session.flush()
    return ca


def server_certificate(ca: CertificateAndKey, hosts: Sequence[str]) -> CertificateAndKey:
    names = [SERVER_NAME, "localhost", "127.0.0.1", *hosts]
    return issue_certificate(
        ca,
        SERVER_NAME,
        organizations=[REPLICA_ORGANIZATION],
        server=True,
        client=True,
        sans=list(dict.fromkeys(names)),
    )


def sign_machine_csr(ca: CertificateAndKey, csr_pem: str, machine_uuid: str) -> x509.Certificate:
    """A client certificate for the CSR's key, naming ``machine_uuid`` whatever the CSR
    asked for."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise CSRError(f"csr: not a PEM certificate signing request ({exc})") from None
    if not csr.is_signature_valid:
        raise CSRError("csr: its signature does not verify")
    issued = issue_certificate(
        ca,
        machine_uuid,
        organizations=["basalt-fleet:machine"],
        client=True,
        public_key=csr.public_key(),
        validity=LINK_VALIDITY,
    )
    return x509.load_pem_x509_certificate(issued.crt.encode())
