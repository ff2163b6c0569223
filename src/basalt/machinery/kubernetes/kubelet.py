"""The kubelet: its KubeletConfiguration file and its command line."""

from __future__ import annotations

import ipaddress
from typing import Any

from ..config import ConfigBundle
from . import paths
from .inputs import AssetInputs

KUBELET_PORT = 10250
CONTAINERD_SOCKET = "unix:///run/containerd/containerd.sock"


def kubelet_configuration(inputs: AssetInputs) -> dict[str, Any]:
    """KubeletConfiguration (kubelet.config.k8s.io/v1beta1) for this node.

    Client certificates are checked against the Kubernetes CA, everything else is
    authorized by the API server (webhook); serving and client certificates rotate.
    Only control planes watch the static pod directory.
    """
    root = inputs.host_root
    config: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": "0.0.0.0",
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True, "cacheTTL": "2m0s"},
            "x509": {"clientCAFile": paths.host_path(root, paths.CA_CRT)},
        },
        "authorization": {
            "mode": "Webhook",
            "webhook": {"cacheAuthorizedTTL": "5m0s", "cacheUnauthorizedTTL": "30s"},
        },
        "cgroupDriver": "systemd",
        "containerRuntimeEndpoint": CONTAINERD_SOCKET,
        "clusterDNS": [inputs.dns_service_ip],
        "clusterDomain": inputs.dns_domain.rstrip("."),
        "rotateCertificates": True,
        "serverTLSBootstrap": True,
        "tlsMinVersion": "VersionTLS12",
    }
    if inputs.is_controlplane:
        config["staticPodPath"] = paths.host_path(root, paths.MANIFESTS_DIR)
    return config


def node_ip(bundle: ConfigBundle, address: str) -> str | None:
    """The node IP kubelet registers: ``address`` unless it is outside ``nodeIP.validSubnets``."""
    subnets = bundle.machine.kubelet.node_ip.valid_subnets
    if not subnets:
        return address
    ip = ipaddress.ip_address(address)
    if any(ip in ipaddress.ip_network(s) for s in subnets):
        return address
    return None


def kubelet_args(
    bundle: ConfigBundle, *, address: str, hostname: str, host_root: str = "/"
) -> list[str]:
    """kubelet's flags (without the binary): the rendered files first, then ``extraArgs``.

    A flag in ``MachineConfig.kubelet.extraArgs`` replaces Basalt's flag of the same name.
    """
    flags = {
        "config": paths.host_path(host_root, paths.KUBELET_CONFIG),
        "bootstrap-kubeconfig": paths.host_path(host_root, paths.BOOTSTRAP_KUBECONFIG),
        "kubeconfig": paths.host_path(host_root, paths.KUBELET_KUBECONFIG),
        "cert-dir": paths.host_path(host_root, paths.KUBELET_CERT_DIR),
        "hostname-override": hostname,
    }
    chosen = node_ip(bundle, address)
    if chosen is not None:
        flags["node-ip"] = chosen
    flags |= bundle.machine.kubelet.extra_args
    return [f"--{name}={value}" for name, value in flags.items()]
