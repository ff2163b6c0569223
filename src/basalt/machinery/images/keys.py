"""Image signing keys: Ed25519 key pairs, key ids, and the keys a node trusts.

A key id is the sha256 of the raw 32-byte public key, in lowercase hex: it is the
same whatever the PEM wrapping, and anyone can compute it from the ``.pub`` file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .errors import SigningKeyError

if TYPE_CHECKING:
    from ..config.bundle import ConfigBundle


@dataclass(frozen=True)
class VerificationKey:
    """A public key trusted to sign bundles, with its id and a label for messages."""

    key_id: str
    public_key: ed25519.Ed25519PublicKey
    name: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} ({self.key_id})" if self.name else self.key_id


def generate_signing_key() -> tuple[str, str]:
    """A new Ed25519 key pair as ``(private_pem, public_pem)`` (PKCS#8 and SPKI PEM)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    return private, public_pem(key.public_key())


def public_pem(key: ed25519.Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def key_id(key: ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey) -> str:
    """sha256 of the raw public key, hex."""
    public = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_signing_key(pem: str | bytes, source: str = "signing key") -> ed25519.Ed25519PrivateKey:
    """Parse an unencrypted PEM Ed25519 private key or raise :class:`SigningKeyError`."""
    data = pem.encode() if isinstance(pem, str) else pem
    if b"PRIVATE KEY-----" not in data:
        raise SigningKeyError(
            f"{source} is not a PEM private key (no BEGIN PRIVATE KEY line)",
            hint="give the .key file written by `basaltctl gen signing-key`",
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(
            f"{source} does not parse: {exc}", hint="an unencrypted PKCS#8 Ed25519 key is needed"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningKeyError(
            f"{source} is a {type(key).__name__}, not an Ed25519 key",
            hint="bundles are signed with Ed25519 keys: `basaltctl gen signing-key` makes one",
        )
    return key


def load_public_key(pem: str | bytes, source: str = "public key") -> ed25519.Ed25519PublicKey:
    """Parse a PEM Ed25519 public key or raise :class:`SigningKeyError`."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(
            f"{source} does not parse as a PEM public key: {exc}",
            hint="give the .pub file written by `basaltctl gen signing-key`",
        ) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningKeyError(
            f"{source} is a {type(key).__name__}, not an Ed25519 key",
            hint="bundle signing keys are Ed25519",
        )
    return key


def verification_key(pem: str | bytes, name: str = "") -> VerificationKey:
    """A trusted key from its PEM public key (or, for convenience, its private key)."""
    data = pem.encode() if isinstance(pem, str) else pem
    label = name or "public key"
    if b"PRIVATE KEY-----" in data:
        public = load_signing_key(data, label).public_key()
    else:
        public = load_public_key(data, label)
    return VerificationKey(key_id(public), public, name)


def trusted_keys(keys: Iterable[VerificationKey]) -> dict[str, VerificationKey]:
    """Keys by id; the same key given twice counts once."""
    return {k.key_id: k for k in keys}


def trusted_keys_from_config(bundle: ConfigBundle) -> list[VerificationKey]:
    """The keys in every ``ImageVerificationConfig`` of a machine config, in file order.

    An empty list means the node trusts no key: every bundle is refused.
    """
    from ..config.system import ImageVerificationConfig

    found: list[VerificationKey] = []
    for document in bundle.all(ImageVerificationConfig):
        found.extend(verification_key(k.public_key, k.name) for k in document.keys)
    return list(trusted_keys(found).values())


def trust_document(public_pem: str, name: str) -> str:
    """A machine config document (``ImageVerificationConfig``) trusting one public key."""
    indented = "".join(f"      {line}\n" for line in public_pem.splitlines())
    return (
        "apiVersion: basalt.dev/v1alpha1\nkind: ImageVerificationConfig\nkeys:\n"
        f"  - name: {name}\n    publicKey: |\n{indented}"
    )
