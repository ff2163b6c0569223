"""Render every Kubernetes asset of one node: path in the node view -> (bytes, mode).

Control planes get the PKI, the encryption config, kubeconfigs for the admin and the
control plane components, and the static pod manifests; every node gets the kubelet
config, the kubelet bootstrap kubeconfig and the Kubernetes CA certificate. Nothing
here touches a file: writing the result is the caller's (trivial) job.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..config import ConfigBundle
from ..yamlio import dump_document
from . import paths
from .certificates import (
    ADMIN_CN,
    CONTROLLER_MANAGER_CN,
    SCHEDULER_CN,
    issue_client_identities,
    render_pki,
)
from .inputs import AssetInputs, ControlPlaneSecrets
from .kubeconfig import build_kubeconfig, dump_kubeconfig
from .kubelet import kubelet_configuration
from .manifests import render_manifests

#: The user name kubelets present while they bootstrap (a bootstrap token's user).
BOOTSTRAP_USER = "kubelet-bootstrap"


class Asset(NamedTuple):
    """One file's content and its permission bits."""

    data: bytes
    mode: int

    @property
    def secret(self) -> bool:
        return self.mode & 0o077 == 0


def encryption_configuration(secretbox_secret: str) -> dict[str, Any]:
    """EncryptionConfiguration: Secrets encrypted with secretbox; plain reads still work."""
    return {
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "EncryptionConfiguration",
        "resources": [
            {
                "resources": ["secrets"],
                "providers": [
                    {"secretbox": {"keys": [{"name": "key1", "secret": secretbox_secret}]}},
                    {"identity": {}},
                ],
            }
        ],
    }


def _controlplane_files(inputs: AssetInputs, secrets: ControlPlaneSecrets) -> dict[str, str]:
    files = render_pki(inputs, secrets)
    files[paths.ENCRYPTION_CONFIG] = dump_document(
        encryption_configuration(secrets.secretbox_secret)
    )
    clients = issue_client_identities(secrets)
    ca = secrets.kubernetes_ca.crt
    kubeconfigs = {
        paths.ADMIN_KUBECONFIG: (inputs.endpoint, ADMIN_CN, clients.admin),
        paths.CONTROLLER_MANAGER_KUBECONFIG: (
            inputs.local_server,
            CONTROLLER_MANAGER_CN,
            clients.controller_manager,
        ),
        paths.SCHEDULER_KUBECONFIG: (inputs.local_server, SCHEDULER_CN, clients.scheduler),
    }
    for path, (server, user, identity) in kubeconfigs.items():
        files[path] = dump_kubeconfig(
            build_kubeconfig(
                cluster=inputs.cluster_name, server=server, ca_crt=ca, user=user, client=identity
            )
        )
    for path, pod in render_manifests(inputs, files).items():
        files[path] = dump_document(pod)
    return files


def render(inputs: AssetInputs) -> dict[str, Asset]:
    """Every asset of the node ``inputs`` describes; new keys and certificates each call.

    Raises :class:`~.inputs.KubernetesAssetError` when a control plane's config lacks a
    CA key or secret.
    """
    files: dict[str, str] = {paths.CA_CRT: inputs.kubernetes_ca.crt}
    if inputs.is_controlplane:
        files |= _controlplane_files(inputs, inputs.controlplane_secrets())
    files[paths.BOOTSTRAP_KUBECONFIG] = dump_kubeconfig(
        build_kubeconfig(
            cluster=inputs.cluster_name,
            server=inputs.endpoint,
            ca_crt=inputs.kubernetes_ca.crt,
            user=BOOTSTRAP_USER,
            token=inputs.bootstrap_token,
        )
    )
    files[paths.KUBELET_CONFIG] = dump_document(kubelet_configuration(inputs))
    return {
        path: Asset(text.encode(), paths.mode_for(path)) for path, text in sorted(files.items())
    }


def render_assets(
    bundle: ConfigBundle, *, address: str, hostname: str, host_root: str = "/"
) -> dict[str, Asset]:
    """:func:`render` for the node at ``address`` called ``hostname`` running ``bundle``."""
    return render(
        AssetInputs.from_bundle(bundle, address=address, hostname=hostname, host_root=host_root)
    )
