"""Kubernetes assets of a node, rendered from its machine config (pure: no file I/O).

:func:`render_assets` returns every file a node needs to run Kubernetes, keyed by its
path in the node's filesystem view (:mod:`.paths`), each with its content and mode.
:func:`kubelet_args` is kubelet's command line pointing at those files, and
:func:`merge_kubeconfig` merges a kubeconfig into a user's file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from basalt.machinery import lazy

from . import paths

if TYPE_CHECKING:
    from .inputs import AssetInputs, KubernetesAssetError
    from .kubeconfig import (
        KubeconfigError,
        MergeResult,
        build_kubeconfig,
        dump_kubeconfig,
        merge_kubeconfig,
        parse_kubeconfig,
    )
    from .kubelet import kubelet_args
    from .render import Asset, render_assets

#: Imported on first use: the inputs need the config models, which a node in maintenance
#: (only ``paths`` so far) has no use for.
__getattr__ = lazy.exports(
    __name__,
    {
        "inputs": ("AssetInputs", "KubernetesAssetError"),
        "kubeconfig": (
            "KubeconfigError",
            "MergeResult",
            "build_kubeconfig",
            "dump_kubeconfig",
            "merge_kubeconfig",
            "parse_kubeconfig",
        ),
        "kubelet": ("kubelet_args",),
        "render": ("Asset", "render_assets"),
    },
)

__all__ = [
    "Asset",
    "AssetInputs",
    "KubeconfigError",
    "KubernetesAssetError",
    "MergeResult",
    "build_kubeconfig",
    "dump_kubeconfig",
    "kubelet_args",
    "merge_kubeconfig",
    "parse_kubeconfig",
    "paths",
    "render_assets",
]
