"""Machine config documents: models, loading, validation, patches and generation.

Names are imported on first use, so that a program that only needs part of this
package (the CLI reading a client config, say) does not pay for all of it.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._base import API_VERSION, DOCUMENT_KINDS, Document
    from .bundle import ConfigBundle, bundle_from_raw, load_bundle
    from .cluster import ClusterConfig
    from .contract import CURRENT as CURRENT_CONTRACT
    from .contract import Contract, resolve_contract
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
    from .validate import Mode, check_bundle, validate_bundle


_HOMES = {
    "API_VERSION": "._base",
    "DOCUMENT_KINDS": "._base",
    "Document": "._base",
    "ConfigBundle": ".bundle",
    "bundle_from_raw": ".bundle",
    "load_bundle": ".bundle",
    "ClusterConfig": ".cluster",
    "CURRENT_CONTRACT": ".contract",
    "Contract": ".contract",
    "resolve_contract": ".contract",
    "GeneratedConfigs": ".generate",
    "GenerateOptions": ".generate",
    "generate_configs": ".generate",
    "MachineConfig": ".machine",
    "HostnameConfig": ".network",
    "LinkConfig": ".network",
    "ResolverConfig": ".network",
    "TimeSyncConfig": ".network",
    "JSONPatch": ".patch",
    "MergePatch": ".patch",
    "Patch": ".patch",
    "apply_patches": ".patch",
    "load_patch": ".patch",
    "parse_patch": ".patch",
    "patch_and_check": ".patch",
    "EnvironmentConfig": ".system",
    "EtcFileConfig": ".system",
    "ImageVerificationConfig": ".system",
    "KernelModuleConfig": ".system",
    "LoggingConfig": ".system",
    "SysctlConfig": ".system",
    "Mode": ".validate",
    "check_bundle": ".validate",
    "validate_bundle": ".validate",
}
_RENAMED = {"CURRENT_CONTRACT": "CURRENT"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), _RENAMED.get(name, name))
    globals()[name] = value
    return value


__all__ = [
    "API_VERSION",
    "CURRENT_CONTRACT",
    "DOCUMENT_KINDS",
    "ClusterConfig",
    "ConfigBundle",
    "Contract",
    "Document",
    "EnvironmentConfig",
    "EtcFileConfig",
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
