"""KernelParams: each sysctl Basalt sets (its defaults, then the config's SysctlConfig
documents), the value wanted and the value the kernel reports now. Read-only: the sysctls
controller (metal) is the one that writes them.

Read again whenever the config changes and every half minute, since other software
(the kubelet, a CNI) may change a parameter afterwards. In container mode the host's
kernel is not the node's: the values are the host's and ``applied`` is false.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from basalt.machinery.resources.specs import KernelParamSpec

from ..runtime import ResourceStore
from ..sys.sysctl import read_sysctl
from .polling import PollingController
from .sysctls import DEFAULT_SYSCTLS, wanted_sysctls

if TYPE_CHECKING:
    from ..node import Node


#: Seconds between two reads.
INTERVAL = 30.0


def read_params(
    wanted: dict[str, str], configured: set[str], root: Path, *, applied: bool
) -> dict[str, KernelParamSpec]:
    """``wanted`` (key -> value) with what ``root`` (a /proc/sys) reports for each key;
    ``configured``: the keys the config sets (the others are Basalt's defaults)."""
    params = {}
    for key, value in wanted.items():
        now, error = "", ""
        try:
            # Multi-value parameters come back tab-separated; shown as sysctl(8) does.
            now = " ".join(read_sysctl(key, root).split())
        except ValueError as exc:
            error = str(exc)
        except FileNotFoundError:
            error = "no such parameter on this kernel"
        except OSError as exc:
            error = exc.strerror or str(exc)
        source = "config" if key in configured or key not in DEFAULT_SYSCTLS else "default"
        params[key] = KernelParamSpec(
            value=now, wanted=value, source=source, applied=applied, error=error
        )
    return params


class KernelParamsController(PollingController):
    name = "kernel-params"
    inputs = ("MachineConfigs",)
    outputs = ("KernelParams",)

    def __init__(self, node: Node, interval: float = INTERVAL) -> None:
        super().__init__(node, interval)

    def wanted(self) -> tuple[dict[str, str], set[str]]:
        """Every key Basalt sets with its value, and the keys the config sets."""
        documents = []
        if self.node.config is not None:
            from basalt.machinery.config.system import SysctlConfig

            documents = self.node.config.all(SysctlConfig)
        return wanted_sysctls(documents), {k for d in documents for k in d.sysctls}

    async def refresh(self, store: ResourceStore) -> None:
        platform = self.node.platform
        wanted, configured = self.wanted()
        params = await asyncio.to_thread(
            read_params,
            wanted,
            configured,
            platform.system_root / "proc" / "sys",
            applied=platform.mode.manages_kernel,
        )
        self.publish(store, "KernelParams", params)
