"""The control plane's PKI: leaf certificates signed by the config's CAs, new keys each time.

Every certificate kubeadm would make for one control plane node, with the same subjects
and usages: the API server's serving certificate, its clients of kubelets, etcd and
aggregated API servers, the controller-manager's and scheduler's client identities, and
the cluster admin's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pki import CertificateAndKey, issue_certificate, load_private_key, public_key_pem
from . import paths
from .inputs import AssetInputs, ControlPlaneSecrets

#: Kubernetes' superuser group: members pass every RBAC check.
MASTERS_GROUP = "system:masters"
APISERVER_CN = "kube-apiserver"
APISERVER_KUBELET_CLIENT_CN = "apiserver-kubelet-client"
APISERVER_ETCD_CLIENT_CN = "kube-apiserver-etcd-client"
FRONT_PROXY_CLIENT_CN = "front-proxy-client"
CONTROLLER_MANAGER_CN = "system:kube-controller-manager"
SCHEDULER_CN = "system:kube-scheduler"
ADMIN_CN = "admin"


@dataclass(frozen=True)
class ClientIdentities:
    """Client certificates that go into kubeconfigs rather than into files of their own."""

    admin: CertificateAndKey
    controller_manager: CertificateAndKey
    scheduler: CertificateAndKey


def apiserver_sans(inputs: AssetInputs) -> list[str]:
    """Names and addresses the API server answers to, without duplicates, in a fixed order."""
    domain = inputs.dns_domain.rstrip(".")
    names = [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        f"kubernetes.default.svc.{domain}",
        *inputs.api_service_ips,
        inputs.endpoint_host,
        inputs.address,
        inputs.hostname,
        "localhost",
        "127.0.0.1",
        *inputs.cert_sans,
    ]
    return list(dict.fromkeys(n for n in names if n))


def _pem_files(crt_path: str, key_path: str, pair: CertificateAndKey) -> dict[str, str]:
    assert pair.key is not None
    return {crt_path: pair.crt, key_path: pair.key}


def render_pki(inputs: AssetInputs, secrets: ControlPlaneSecrets) -> dict[str, str]:
    """The control plane's certificate and key files: path -> PEM text."""
    k8s_ca = secrets.kubernetes_ca
    assert k8s_ca.key is not None
    files: dict[str, str] = {
        paths.CA_CRT: k8s_ca.crt,
        paths.CA_KEY: k8s_ca.key,
        paths.FRONT_PROXY_CA_CRT: secrets.aggregator_ca.crt,
        paths.ETCD_CA_CRT: secrets.etcd_ca.crt,
    }
    files |= _pem_files(
        paths.APISERVER_CRT,
        paths.APISERVER_KEY,
        issue_certificate(k8s_ca, APISERVER_CN, server=True, sans=apiserver_sans(inputs)),
    )
    files |= _pem_files(
        paths.APISERVER_KUBELET_CLIENT_CRT,
        paths.APISERVER_KUBELET_CLIENT_KEY,
        issue_certificate(
            k8s_ca, APISERVER_KUBELET_CLIENT_CN, organizations=[MASTERS_GROUP], client=True
        ),
    )
    files |= _pem_files(
        paths.FRONT_PROXY_CLIENT_CRT,
        paths.FRONT_PROXY_CLIENT_KEY,
        issue_certificate(secrets.aggregator_ca, FRONT_PROXY_CLIENT_CN, client=True),
    )
    files |= _pem_files(
        paths.APISERVER_ETCD_CLIENT_CRT,
        paths.APISERVER_ETCD_CLIENT_KEY,
        issue_certificate(secrets.etcd_ca, APISERVER_ETCD_CLIENT_CN, client=True),
    )
    files[paths.SA_KEY] = secrets.service_account_key
    files[paths.SA_PUB] = public_key_pem(load_private_key(secrets.service_account_key))
    return files


def issue_client_identities(secrets: ControlPlaneSecrets) -> ClientIdentities:
    ca = secrets.kubernetes_ca
    return ClientIdentities(
        admin=issue_certificate(ca, ADMIN_CN, organizations=[MASTERS_GROUP], client=True),
        controller_manager=issue_certificate(ca, CONTROLLER_MANAGER_CN, client=True),
        scheduler=issue_certificate(ca, SCHEDULER_CN, client=True),
    )
