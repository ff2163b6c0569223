"""The secrets bundle: the one long-lived secret input of a cluster.

``gen secrets`` writes it once; ``gen config`` turns it (plus patches and a version
contract) into machine configs, always the same ones for the same inputs.
"""

from __future__ import annotations

import base64
import secrets as _random
import string
from typing import Literal

from pydantic import Field, ValidationError

from ..errors import ConfigValidationError, Problem, SecretsError, format_path
from ..pki import generate_ca, generate_private_key, private_key_pem
from ..yamlio import dump_document, parse_documents
from ._base import Model
from ._types import Secret32, Token
from .cluster import PEMPrivateKey
from .machine import CertificateAndKey

SECRETS_VERSION = "v1alpha1"
_TOKEN_ALPHABET = string.ascii_lowercase + string.digits


class ClusterSecrets(Model):
    id: Secret32 = Field(description="Cluster id.")
    secret: Secret32 = Field(description="Cluster shared secret.")


class TokenSecrets(Model):
    join_token: Token = Field(description="Workers present it to get API certificates.")
    bootstrap_token: Token = Field(description="Kubelets present it to join Kubernetes.")
    secretbox_encryption_secret: Secret32 = Field(description="Encrypts Secrets at rest.")


class SigningKey(Model):
    key: PEMPrivateKey = Field(description="PEM private key.")


class CertificateAuthorities(Model):
    os: CertificateAndKey = Field(description="OS API CA.")
    etcd: CertificateAndKey = Field(description="etcd CA.")
    kubernetes: CertificateAndKey = Field(description="Kubernetes CA.")
    kubernetes_aggregator: CertificateAndKey = Field(description="Front-proxy CA.")
    kubernetes_service_account: SigningKey = Field(description="Service-account key.")


class SecretsBundle(Model):
    """Everything secret about one cluster. Keep it out of plain Git (encrypt it)."""

    version: Literal["v1alpha1"]
    cluster: ClusterSecrets
    tokens: TokenSecrets
    certs: CertificateAuthorities

    def to_yaml(self) -> str:
        return dump_document(self.model_dump(mode="json", by_alias=True, exclude_none=True))


def _token() -> str:
    pick = _random.choice
    return (
        "".join(pick(_TOKEN_ALPHABET) for _ in range(6))
        + "."
        + "".join(pick(_TOKEN_ALPHABET) for _ in range(16))
    )


def _secret32() -> str:
    return base64.b64encode(_random.token_bytes(32)).decode()


def generate_secrets() -> SecretsBundle:
    """A fresh bundle: four CAs, a service-account key, tokens and cluster secrets."""

    def ca(name: str) -> CertificateAndKey:
        pair = generate_ca(name)
        return CertificateAndKey.model_validate({"crt": pair.crt, "key": pair.key})

    return SecretsBundle.model_validate(
        {
            "version": SECRETS_VERSION,
            "cluster": {"id": _secret32(), "secret": _secret32()},
            "tokens": {
                "joinToken": _token(),
                "bootstrapToken": _token(),
                "secretboxEncryptionSecret": _secret32(),
            },
            "certs": {
                "os": ca("basalt-os").model_dump(by_alias=True),
                "etcd": ca("etcd").model_dump(by_alias=True),
                "kubernetes": ca("kubernetes").model_dump(by_alias=True),
                "kubernetesAggregator": ca("front-proxy").model_dump(by_alias=True),
                "kubernetesServiceAccount": {"key": private_key_pem(generate_private_key())},
            },
        }
    )


def load_secrets(text: str, source: str | None = None) -> SecretsBundle:
    """Parse a secrets bundle; every problem is reported with its field path and line."""
    from .bundle import translate_error

    documents = parse_documents(text, source)
    if len(documents) != 1 or not isinstance(documents[0].data, dict):
        raise SecretsError(
            f"{source or 'secrets'}: a secrets bundle is one YAML mapping",
            hint="generate one with 'basaltctl gen secrets'",
        )
    raw = documents[0]
    version = raw.data.get("version")
    if version != SECRETS_VERSION:
        raise SecretsError(
            f"{source or 'secrets'}: unsupported secrets bundle version {version!r}; "
            f"this basaltctl reads {SECRETS_VERSION}",
            hint="upgrade basaltctl if the bundle is newer; otherwise regenerate it",
        )
    try:
        return SecretsBundle.model_validate(raw.data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc, message, hint = translate_error(SecretsBundle, error)
            problems.append(
                Problem(
                    "SecretsBundle",
                    format_path(loc),
                    message,
                    hint,
                    source=source,
                    line=raw.line_of(loc),
                )
            )
        raise ConfigValidationError(problems, source=source) from None
