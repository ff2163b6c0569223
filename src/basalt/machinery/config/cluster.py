"""``ClusterConfig``: what every node of one cluster shares."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from ._base import Document, Model, register, replace_on_merge, secret
from ._types import Hostname, HttpsURL, Secret32, Subnet, Token, invalid
from .machine import CertificateAndKey, _pem_private_key

_K8S_VERSION = re.compile(r"^v?\d+\.\d+\.\d+$")
_CLUSTER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _kubernetes_version(value: str) -> str:
    if not _K8S_VERSION.match(value):
        raise invalid(f"{value!r} is not a Kubernetes version", "e.g. v1.31.2")
    return value if value.startswith("v") else f"v{value}"


def _cluster_name(value: str) -> str:
    if not _CLUSTER_NAME.match(value):
        raise invalid(
            f"{value!r} is not a valid cluster name",
            "use 1-63 lower-case letters, digits and '-', starting and ending alphanumeric",
        )
    return value


KubernetesVersion = Annotated[str, AfterValidator(_kubernetes_version)]
ClusterName = Annotated[str, AfterValidator(_cluster_name)]
PEMPrivateKey = Annotated[str, AfterValidator(_pem_private_key)]


class ControlPlaneSpec(Model):
    """How nodes reach the Kubernetes API."""

    endpoint: HttpsURL = Field(
        description="The Kubernetes API endpoint, e.g. `https://192.0.2.10:6443`."
    )


class NetworkSpec(Model):
    """Cluster networking."""

    pod_subnets: list[Subnet] = Field(
        min_length=1,
        description="Pod CIDRs.",
        json_schema_extra=replace_on_merge(),
    )
    service_subnets: list[Subnet] = Field(
        min_length=1,
        description="Service CIDRs.",
        json_schema_extra=replace_on_merge(),
    )
    dns_domain: Hostname = Field(description="The cluster DNS domain, e.g. `cluster.local`.")


class EtcdSpec(Model):
    """etcd on control planes."""

    ca: CertificateAndKey | None = Field(
        default=None, description="The etcd CA. Control planes only; workers have none."
    )
    advertised_subnets: list[Subnet] = Field(
        default_factory=list,
        description="Subnets etcd advertises its peer address from.",
        json_schema_extra=replace_on_merge(),
    )
    extra_args: dict[str, str] = Field(
        default_factory=dict, description="Extra etcd flags, without the leading `--`."
    )


class ServiceAccountKey(Model):
    """The key that signs Kubernetes service-account tokens."""

    key: PEMPrivateKey = Field(description="PEM-encoded private key.", json_schema_extra=secret())


class KubernetesSpec(Model):
    """The Kubernetes control plane and its secrets."""

    version: KubernetesVersion = Field(description="Kubernetes version, e.g. `v1.31.2`.")
    ca: CertificateAndKey = Field(description="The Kubernetes CA; workers hold only `crt`.")
    aggregator_ca: CertificateAndKey | None = Field(
        default=None, alias="aggregatorCA", description="The front-proxy CA. Control planes only."
    )
    service_account_key: ServiceAccountKey | None = Field(
        default=None, description="Service-account signing key. Control planes only."
    )
    bootstrap_token: Token = Field(
        description="Token kubelets use to join the cluster.", json_schema_extra=secret()
    )
    secretbox_encryption_secret: Secret32 | None = Field(
        default=None,
        description="Key that encrypts Secrets at rest. Control planes only.",
        json_schema_extra=secret(),
    )


@register
class ClusterConfig(Document):
    """The cluster the node belongs to: identity, endpoint, network, etcd, Kubernetes."""

    kind: Literal["ClusterConfig"] = Field(description="`ClusterConfig`.")
    name: ClusterName = Field(description="The cluster's name.")
    id: Secret32 = Field(description="The cluster's id: 32 random bytes, base64.")
    secret: Secret32 = Field(
        description="The cluster's shared secret: 32 random bytes, base64.",
        json_schema_extra=secret(),
    )
    control_plane: ControlPlaneSpec = Field(description="The control plane endpoint.")
    network: NetworkSpec = Field(description="Cluster networking.")
    etcd: EtcdSpec = Field(default_factory=EtcdSpec, description="etcd settings.")
    kubernetes: KubernetesSpec = Field(description="Kubernetes settings and secrets.")
