"""What rendering needs from a machine config, checked once and gathered in one value.

:class:`AssetInputs` holds exactly what the renderers read, so its fingerprint tells
whether a new config would render different assets: a node keeps its certificates while
the fingerprint stays the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from ..config import ConfigBundle
from ..config.machine import CertificateAndKey as ConfigPair
from ..errors import ConfigError
from ..pki import CertificateAndKey

MachineType = Literal["controlplane", "worker"]

#: Kubernetes' convention: the API service takes the subnet's first address, DNS its tenth.
API_SERVICE_OFFSET = 1
DNS_SERVICE_OFFSET = 10


class KubernetesAssetError(ConfigError):
    """The config lacks something the Kubernetes assets need (a CA key, a secret).

    The message names the field; the hint says how to fix the config.
    """


@dataclass(frozen=True)
class ControlPlaneSecrets:
    """The CA keys and secrets only control planes hold."""

    kubernetes_ca: CertificateAndKey
    aggregator_ca: CertificateAndKey
    etcd_ca: CertificateAndKey
    service_account_key: str
    secretbox_secret: str


@dataclass(frozen=True)
class AssetInputs:
    """Everything the Kubernetes renderers read; see :meth:`from_bundle`."""

    cluster_name: str
    version: str
    machine_type: MachineType
    address: str
    hostname: str
    endpoint: str
    pod_subnets: tuple[str, ...]
    service_subnets: tuple[str, ...]
    dns_domain: str
    cert_sans: tuple[str, ...]
    bootstrap_token: str
    kubernetes_ca: CertificateAndKey
    aggregator_ca: CertificateAndKey | None = None
    etcd_ca: CertificateAndKey | None = None
    service_account_key: str | None = None
    secretbox_secret: str | None = None
    host_root: str = "/"

    @classmethod
    def from_bundle(
        cls, bundle: ConfigBundle, *, address: str, hostname: str, host_root: str = "/"
    ) -> AssetInputs:
        """The inputs of ``bundle`` for the node at ``address`` called ``hostname``.

        ``host_root`` is where the node's filesystem view sits on the host (``/`` on metal).
        """
        machine = bundle.machine
        cluster = bundle.cluster
        k8s = cluster.kubernetes

        return cls(
            cluster_name=cluster.name,
            version=k8s.version,
            machine_type=machine.type,
            address=address,
            hostname=hostname,
            endpoint=cluster.control_plane.endpoint,
            pod_subnets=tuple(cluster.network.pod_subnets),
            service_subnets=tuple(cluster.network.service_subnets),
            dns_domain=cluster.network.dns_domain,
            cert_sans=tuple(machine.cert_sans),
            bootstrap_token=k8s.bootstrap_token,
            kubernetes_ca=CertificateAndKey(k8s.ca.crt, k8s.ca.key),
            aggregator_ca=_pair(k8s.aggregator_ca),
            etcd_ca=_pair(cluster.etcd.ca),
            service_account_key=k8s.service_account_key.key if k8s.service_account_key else None,
            secretbox_secret=k8s.secretbox_encryption_secret,
            host_root=host_root,
        )

    # -- derived values -----------------------------------------------------------------------
    @property
    def is_controlplane(self) -> bool:
        return self.machine_type == "controlplane"

    @property
    def endpoint_host(self) -> str:
        return urlsplit(self.endpoint).hostname or ""

    @property
    def endpoint_port(self) -> int:
        return urlsplit(self.endpoint).port or 443

    @property
    def local_server(self) -> str:
        """The API server on this node, as its own components reach it."""
        return f"https://{url_host(self.address)}:{self.endpoint_port}"

    @property
    def service_account_issuer(self) -> str:
        return f"https://{url_host(self.endpoint_host)}:{self.endpoint_port}"

    @property
    def api_service_ips(self) -> list[str]:
        """The ``kubernetes`` service's address in each service subnet."""
        return [service_ip(subnet, API_SERVICE_OFFSET) for subnet in self.service_subnets]

    @property
    def dns_service_ip(self) -> str:
        return service_ip(self.service_subnets[0], DNS_SERVICE_OFFSET)

    def fingerprint(self) -> str:
        """A digest of every input: equal fingerprints render equivalent assets."""
        data = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()

    def controlplane_secrets(self) -> ControlPlaneSecrets:
        """The control-plane-only secrets; raises :class:`KubernetesAssetError` naming a gap."""
        missing = []
        if self.kubernetes_ca.key is None:
            missing.append("ClusterConfig.kubernetes.ca.key")
        if self.aggregator_ca is None or self.aggregator_ca.key is None:
            missing.append("ClusterConfig.kubernetes.aggregatorCA")
        if self.etcd_ca is None or self.etcd_ca.key is None:
            missing.append("ClusterConfig.etcd.ca")
        if self.service_account_key is None:
            missing.append("ClusterConfig.kubernetes.serviceAccountKey")
        if self.secretbox_secret is None:
            missing.append("ClusterConfig.kubernetes.secretboxEncryptionSecret")
        if missing:
            raise KubernetesAssetError(
                f"a control plane's Kubernetes assets need {', '.join(missing)}",
                hint="generate control plane configs with 'basaltctl gen config' from the "
                "cluster's secrets bundle; they carry every CA key and secret",
            )
        assert self.aggregator_ca is not None and self.etcd_ca is not None
        assert self.service_account_key is not None and self.secretbox_secret is not None
        return ControlPlaneSecrets(
            kubernetes_ca=self.kubernetes_ca,
            aggregator_ca=self.aggregator_ca,
            etcd_ca=self.etcd_ca,
            service_account_key=self.service_account_key,
            secretbox_secret=self.secretbox_secret,
        )


def _pair(value: ConfigPair | None) -> CertificateAndKey | None:
    return CertificateAndKey(value.crt, value.key) if value is not None else None


def url_host(host: str) -> str:
    """``host`` as it goes into a URL: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def service_ip(subnet: str, offset: int) -> str:
    """The address ``offset`` hosts into ``subnet``; raises when the subnet is too small."""
    network = ipaddress.ip_network(subnet)
    if network.num_addresses <= offset + 1:
        raise KubernetesAssetError(
            f"service subnet {subnet} is too small: it has no address at offset {offset}",
            hint="use a service subnet of at least /27 (IPv4) or /123 (IPv6); "
            "ClusterConfig.network.serviceSubnets",
        )
    return str(network.network_address + offset)
