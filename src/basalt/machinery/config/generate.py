"""``gen config``: secrets bundle + options + version contract + patches -> machine configs.

Pure and deterministic: the same inputs always give byte-identical configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ._base import API_VERSION
from .bundle import ConfigBundle
from .contract import Contract, ContractDefaults, resolve_contract
from .patch import Patch, patch_and_check

if TYPE_CHECKING:
    from .secrets import SecretsBundle

MachineType = Literal["controlplane", "worker"]


@dataclass(frozen=True)
class GenerateOptions:
    """The command-line choices of ``gen config`` (None: take the contract's default)."""

    cluster_name: str
    endpoint: str
    version_contract: str | None = None
    kubernetes_version: str | None = None
    install_disk: str | None = None
    install_image: str | None = None
    additional_sans: tuple[str, ...] = ()
    dns_domain: str | None = None


@dataclass(frozen=True)
class GeneratedConfigs:
    controlplane: ConfigBundle
    worker: ConfigBundle
    contract: Contract
    warnings: list[str] = field(default_factory=list)

    def for_type(self, machine_type: MachineType) -> ConfigBundle:
        return self.controlplane if machine_type == "controlplane" else self.worker


def _pair(pair: Any, with_key: bool) -> dict[str, Any]:
    out = {"crt": pair.crt}
    if with_key:
        out["key"] = pair.key
    return out


def base_documents(
    secrets: SecretsBundle,
    options: GenerateOptions,
    contract: Contract,
    defaults: ContractDefaults,
    machine_type: MachineType,
) -> list[dict[str, Any]]:
    """The unpatched MachineConfig and ClusterConfig for one machine type."""
    cp = machine_type == "controlplane"
    certs = secrets.certs
    k8s_version = options.kubernetes_version or defaults.kubernetes_version
    kubelet_image = defaults.kubelet_image
    if options.kubernetes_version:
        kubelet_image = f"{kubelet_image.rsplit(':', 1)[0]}:{k8s_version}"
    install: dict[str, Any] = {"image": options.install_image or defaults.install_image}
    if options.install_disk:
        install = {"disk": options.install_disk, **install}
    machine: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "MachineConfig",
        "type": machine_type,
        "versionContract": str(contract),
        "token": secrets.tokens.join_token,
        "ca": _pair(certs.os, cp),
        "certSANs": list(options.additional_sans),
        "install": install,
        "kubelet": {"image": kubelet_image},
        "features": {"rbac": defaults.rbac, "stableHostname": defaults.stable_hostname},
    }
    kubernetes: dict[str, Any] = {
        "version": k8s_version,
        "ca": _pair(certs.kubernetes, cp),
        "bootstrapToken": secrets.tokens.bootstrap_token,
    }
    etcd: dict[str, Any] = {}
    if cp:
        kubernetes["aggregatorCA"] = _pair(certs.kubernetes_aggregator, True)
        kubernetes["serviceAccountKey"] = {"key": certs.kubernetes_service_account.key}
        kubernetes["secretboxEncryptionSecret"] = secrets.tokens.secretbox_encryption_secret
        etcd["ca"] = _pair(certs.etcd, True)
    cluster: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "ClusterConfig",
        "name": options.cluster_name,
        "id": secrets.cluster.id,
        "secret": secrets.cluster.secret,
        "controlPlane": {"endpoint": options.endpoint},
        "network": {
            "podSubnets": list(defaults.pod_subnets),
            "serviceSubnets": list(defaults.service_subnets),
            "dnsDomain": options.dns_domain or defaults.dns_domain,
        },
        "etcd": etcd,
        "kubernetes": kubernetes,
    }
    return [machine, cluster]


def generate_configs(
    secrets: SecretsBundle,
    options: GenerateOptions,
    *,
    patches: Sequence[Patch] = (),
    controlplane_patches: Sequence[Patch] = (),
    worker_patches: Sequence[Patch] = (),
) -> GeneratedConfigs:
    """Generate, patch and validate both configs; raises on any error, writes nothing."""
    resolved = resolve_contract(options.version_contract)
    warnings = [resolved.warning] if resolved.warning else []
    bundles: dict[MachineType, ConfigBundle] = {}
    per_type: tuple[tuple[MachineType, Sequence[Patch]], ...] = (
        ("controlplane", controlplane_patches),
        ("worker", worker_patches),
    )
    for machine_type, own in per_type:
        target = f"{machine_type}.yaml"
        documents = base_documents(
            secrets, options, resolved.contract, resolved.defaults, machine_type
        )
        bundle, problems = patch_and_check(documents, [*patches, *own], target=target)
        warnings.extend(p.render() for p in problems)
        bundles[machine_type] = bundle
    return GeneratedConfigs(bundles["controlplane"], bundles["worker"], resolved.contract, warnings)
