"""Certificate helpers: CAs, leaf certificates and PEM parsing (via ``cryptography``).

Every key Basalt makes is ECDSA P-256: small, fast to generate, and accepted by
gRPC, etcd and Kubernetes alike. Ed25519 is used for image signing keys only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import BasaltError

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=365)

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class PKIError(BasaltError):
    """A certificate or key is malformed, or a certificate does not match its key."""


@dataclass(frozen=True)
class CertificateAndKey:
    """A PEM certificate and, where this holder may sign, its PEM private key."""

    crt: str
    key: str | None = None


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_key_pem(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def load_certificate(pem: str) -> x509.Certificate:
    """Parse one PEM certificate or raise :class:`PKIError` saying why not."""
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise PKIError("not a PEM certificate (no BEGIN CERTIFICATE line)")
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise PKIError(f"certificate does not parse: {exc}") from None


def load_private_key(pem: str) -> PrivateKey:
    """Parse one unencrypted PEM private key or raise :class:`PKIError`."""
    if "PRIVATE KEY-----" not in pem:
        raise PKIError("not a PEM private key (no BEGIN ... PRIVATE KEY line)")
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"private key does not parse: {exc}") from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    ):
        raise PKIError(f"unsupported private key type {type(key).__name__}")
    return key


def load_ed25519_public_key(pem: str) -> ed25519.Ed25519PublicKey:
    """Parse a PEM Ed25519 public key (an image signing key) or raise :class:`PKIError`."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise PKIError(f"public key does not parse: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise PKIError(f"want an Ed25519 public key, got {type(key).__name__}")
    return key


def _spki(key: PrivateKey | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_matches_certificate(crt_pem: str, key_pem: str) -> bool:
    """True when the private key belongs to the certificate's public key."""
    return _spki(load_certificate(crt_pem)) == _spki(load_private_key(key_pem))


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def self_signed(
    key: ec.EllipticCurvePrivateKey, name: x509.Name, validity: dt.timedelta
) -> x509.CertificateBuilder:
    """The start of a self-signed certificate for ``key``: subject and issuer ``name``,
    valid from five minutes ago (clocks differ) for ``validity``; extensions to add."""
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
    )


def generate_ca(common_name: str, organizations: Sequence[str] = ()) -> CertificateAndKey:
    """A new self-signed CA, valid for ten years."""
    key = generate_private_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        self_signed(key, _name(common_name, organizations), CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAndKey(
        crt=cert.public_bytes(serialization.Encoding.PEM).decode(), key=private_key_pem(key)
    )


def san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    """Subject alternative names: IP addresses as such, anything else as a DNS name."""
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def issue_certificate(
    ca: CertificateAndKey,
    common_name: str,
    *,
    organizations: Sequence[str] = (),
    server: bool = False,
    client: bool = False,
    sans: Iterable[str] = (),
    validity: dt.timedelta = LEAF_VALIDITY,
    key: PrivateKey | None = None,
    public_key: CertificatePublicKeyTypes | None = None,
) -> CertificateAndKey:
    """Sign a leaf certificate with ``ca``; returns it with its (new or given) key.

    With ``public_key`` (a CSR's: the holder keeps its key) the result's ``key`` is ''."""
    if ca.key is None:
        raise PKIError(f"cannot sign {common_name!r}: this CA has no private key here")
    ca_cert = load_certificate(ca.crt)
    ca_key = load_private_key(ca.key)
    leaf_key = key or (None if public_key is not None else generate_private_key())
    subject_key = leaf_key.public_key() if leaf_key is not None else public_key
    assert subject_key is not None
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organizations))
        .issuer_name(ca_cert.subject)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(leaf_key, rsa.RSAPrivateKey)
                or isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    san_list = san_entries(sans)
    if san_list:
        builder = builder.add_extension(x509.SubjectAlternativeName(san_list), critical=False)
    algorithm = None if isinstance(ca_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = builder.sign(ca_key, algorithm)
    return CertificateAndKey(
        crt=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key="" if leaf_key is None else private_key_pem(leaf_key),
    )


def verify_issued_by(crt_pem: str, ca_pem: str) -> bool:
    """True when ``crt_pem`` carries a valid signature by the CA in ``ca_pem``."""
    try:
        load_certificate(crt_pem).verify_directly_issued_by(load_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def certificate_organizations(crt_pem: str) -> list[str]:
    """The subject's Organization values: Basalt carries a client's roles there."""
    cert = load_certificate(crt_pem)
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
