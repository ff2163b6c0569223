"""Certificates that ``basalt.machinery.pki`` would never make: expired, future, non-CA.

The validation rules must reject them; building them needs the ``cryptography`` builder
directly, with the validity window and CA flag under the test's control.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from basalt.machinery.pki import CertificateAndKey, private_key_pem


def make_certificate(
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    ca: bool = True,
    common_name: str = "test-ca",
) -> CertificateAndKey:
    """A self-signed P-256 certificate with the given window and CA flag, with its key."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertificateAndKey(
        crt=cert.public_bytes(serialization.Encoding.PEM).decode(), key=private_key_pem(key)
    )


def ed25519_public_pem() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def client_certificate(
    ca: CertificateAndKey,
    organizations: list[str],
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    common_name: str = "test-client",
) -> CertificateAndKey:
    """A client certificate signed by ``ca`` with any validity window (e.g. expired)."""
    from basalt.machinery.pki import load_certificate, load_private_key

    assert ca.key is not None
    ca_cert = load_certificate(ca.crt)
    ca_key = load_private_key(ca.key)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return CertificateAndKey(
        crt=cert.public_bytes(serialization.Encoding.PEM).decode(), key=private_key_pem(key)
    )
