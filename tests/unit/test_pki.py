"""Certificate helpers: parsing errors, issuing, matching, and roles in certificates."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from basalt.machinery import pki
from basalt.machinery.config.secrets import SecretsBundle
from basalt.machinery.pki import CertificateAndKey, PKIError
from basalt.machinery.roles import CLIENT_ROLES, parse_roles
from tests.fakes.pki import ed25519_public_pem


def os_ca(secrets: SecretsBundle) -> CertificateAndKey:
    return CertificateAndKey(crt=secrets.certs.os.crt, key=secrets.certs.os.key)


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        ("nope", "no BEGIN CERTIFICATE line"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "does not parse"),
    ],
)
def test_load_certificate_errors(pem: str, message: str) -> None:
    with pytest.raises(PKIError, match=message):
        pki.load_certificate(pem)


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        ("nope", "not a PEM private key"),
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "does not parse"),
    ],
)
def test_load_private_key_errors(pem: str, message: str) -> None:
    with pytest.raises(PKIError, match=message):
        pki.load_private_key(pem)


def test_ed25519_public_key() -> None:
    pki.load_ed25519_public_key(ed25519_public_pem())
    with pytest.raises(PKIError, match="does not parse"):
        pki.load_ed25519_public_key("x")
    ec_public = pki.public_key_pem(pki.generate_private_key())
    with pytest.raises(PKIError, match="want an Ed25519 public key"):
        pki.load_ed25519_public_key(ec_public)


def test_issue_server_certificate_with_sans(secrets: SecretsBundle) -> None:
    issued = pki.issue_certificate(
        os_ca(secrets), "cp-1", server=True, sans=["cp-1.example.com", "192.0.2.10", "2001:db8::1"]
    )
    assert issued.key is not None
    assert pki.key_matches_certificate(issued.crt, issued.key)
    assert pki.verify_issued_by(issued.crt, secrets.certs.os.crt)
    cert = pki.load_certificate(issued.crt)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["cp-1.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("2001:db8::1"),
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ca_cert = pki.load_certificate(secrets.certs.os.crt)
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


def test_issuing_needs_the_ca_key(secrets: SecretsBundle) -> None:
    with pytest.raises(PKIError, match="this CA has no private key here"):
        pki.issue_certificate(CertificateAndKey(crt=secrets.certs.os.crt), "x")


def test_key_of_another_ca_does_not_match(secrets: SecretsBundle) -> None:
    assert secrets.certs.etcd.key is not None
    assert not pki.key_matches_certificate(secrets.certs.os.crt, secrets.certs.etcd.key)
    assert not pki.verify_issued_by(secrets.certs.os.crt, secrets.certs.etcd.crt)


def test_roles_round_trip_through_certificate_organizations(secrets: SecretsBundle) -> None:
    issued = pki.issue_certificate(
        os_ca(secrets),
        "admin",
        client=True,
        organizations=[r.value for r in CLIENT_ROLES] + ["other"],
    )
    organizations = pki.certificate_organizations(issued.crt)
    assert parse_roles(organizations) == set(CLIENT_ROLES)
    assert parse_roles(["os:root", "system:masters"]) == set()
