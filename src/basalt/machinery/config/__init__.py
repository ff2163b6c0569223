"""Machine config documents: models, loading, validation, patches and generation.

Importing this package registers every document kind.
"""

from ._base import API_VERSION, DOCUMENT_KINDS, Document
from .bundle import ConfigBundle, bundle_from_raw, load_bundle
from .cluster import ClusterConfig
from .contract import CURRENT as CURRENT_CONTRACT
from .contract import Contract, resolve_contract
from .discovery import DiscoveryConfig
from .fleet import FleetConfig
from .generate import GeneratedConfigs, GenerateOptions, generate_configs
from .machine import MachineConfig
from .network import HostnameConfig, LinkConfig, ResolverConfig, TimeSyncConfig
from .patch import (
    JSONPatch,
    MergePatch,
    Patch,
    apply_patches,
    load_patch,
    parse_patch,
    patch_and_check,
)
from .system import (
    EnvironmentConfig,
    EtcFileConfig,
    ImageVerificationConfig,
    KernelModuleConfig,
    LoggingConfig,
    SysctlConfig,
)
from .update import UpdateConfig
from .validate import Mode, check_bundle, validate_bundle

__all__ = [
    "API_VERSION",
    "CURRENT_CONTRACT",
    "DOCUMENT_KINDS",
    "ClusterConfig",
    "ConfigBundle",
    "Contract",
    "DiscoveryConfig",
    "Document",
    "EnvironmentConfig",
    "EtcFileConfig",
    "FleetConfig",
    "GenerateOptions",
    "GeneratedConfigs",
    "HostnameConfig",
    "ImageVerificationConfig",
    "JSONPatch",
    "KernelModuleConfig",
    "LinkConfig",
    "LoggingConfig",
    "MachineConfig",
    "MergePatch",
    "Mode",
    "Patch",
    "ResolverConfig",
    "SysctlConfig",
    "TimeSyncConfig",
    "UpdateConfig",
    "apply_patches",
    "bundle_from_raw",
    "check_bundle",
    "generate_configs",
    "load_bundle",
    "load_patch",
    "parse_patch",
    "patch_and_check",
    "resolve_contract",
    "validate_bundle",
]
