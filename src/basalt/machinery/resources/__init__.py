"""Typed resource specs shared by node and client: what ``basaltctl get`` shows.

A resource is (namespace, type, id, version, spec). The node keeps them in a watchable
store; the API sends specs as JSON; the client renders them with the columns below.
"""

from .definitions import (
    DEFINITIONS,
    ResourceDefinition,
    UnknownResourceTypeError,
    resolve_type,
)
from .record import Spec, SpecError
from .specs import (
    AffiliateSpec,
    BootStatusSpec,
    DiscoveryStatusSpec,
    EtcdMemberSpec,
    EtcdStatusSpec,
    HostnameSpec,
    KubernetesAssetFile,
    KubernetesAssetsSpec,
    MachineConfigSpec,
    MachineStatusSpec,
    MemberSpec,
    NodeAddressesSpec,
    ResourceDefinitionSpec,
    ServiceStatusSpec,
    SystemStatsSpec,
    TimeStatusSpec,
    UnmetCondition,
    UpdateStatusSpec,
    VersionSpec,
)

__all__ = [
    "DEFINITIONS",
    "AffiliateSpec",
    "BootStatusSpec",
    "DiscoveryStatusSpec",
    "EtcdMemberSpec",
    "EtcdStatusSpec",
    "HostnameSpec",
    "KubernetesAssetFile",
    "KubernetesAssetsSpec",
    "MachineConfigSpec",
    "MachineStatusSpec",
    "MemberSpec",
    "NodeAddressesSpec",
    "ResourceDefinition",
    "ResourceDefinitionSpec",
    "ServiceStatusSpec",
    "Spec",
    "SpecError",
    "SystemStatsSpec",
    "TimeStatusSpec",
    "UnknownResourceTypeError",
    "UnmetCondition",
    "UpdateStatusSpec",
    "VersionSpec",
    "resolve_type",
]
