"""Kernel parameters on metal: SysctlConfig -> writes under /proc/sys.

Basalt's defaults (:data:`DEFAULT_SYSCTLS`) come first, config overrides them. Each key
is written when its value differs from what this controller last wrote; a key that
fails (no such sysctl, a value the kernel refuses) is reported by name as the
controller's error and retried with the engine's backoff, while the other keys are
still applied. In container mode the host's kernel is not ours: nothing happens.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from basalt.machinery.errors import BasaltError

from ..runtime import Controller, ResourceStore
from ..sys.sysctl import sysctl_path, write_sysctl

if TYPE_CHECKING:
    from basalt.machinery.config.system import SysctlConfig

    from ..node import Node

log = logging.getLogger(__name__)


#: Set on every metal node unless config says otherwise: removing a primary IPv4 address
#: promotes a secondary one instead of deleting every address of its subnet.
DEFAULT_SYSCTLS = {
    "net.ipv4.conf.all.promote_secondaries": "1",
    "net.ipv4.conf.default.promote_secondaries": "1",
}


class SysctlError(BasaltError):
    """Some sysctls could not be set; the message names each key and the reason."""


def wanted_sysctls(documents: list[SysctlConfig]) -> dict[str, str]:
    """The defaults, then every SysctlConfig's keys; later documents win."""
    merged: dict[str, str] = dict(DEFAULT_SYSCTLS)
    for document in documents:
        merged.update(document.sysctls)
    return merged


def _reason(exc: OSError, key: str, root: Path) -> str:
    if exc.errno == errno.ENOENT:
        return f"no such sysctl ({sysctl_path(key, root)})"
    if exc.errno == errno.EINVAL:
        return "the kernel refused the value"
    return exc.strerror or str(exc)


def apply_sysctls(wanted: dict[str, str], root: Path) -> dict[str, str]:
    """Write each key; returns {key: reason} for those that failed. Blocking."""
    failed = {}
    for key, value in wanted.items():
        try:
            write_sysctl(key, value, root)
        except ValueError as exc:
            failed[key] = str(exc)
        except OSError as exc:
            failed[key] = _reason(exc, key, root)
    return failed


class SysctlsController(Controller):
    name = "sysctls"
    inputs = ("MachineConfigs",)

    def __init__(self, node: Node) -> None:
        self.node = node
        self._written: dict[str, str] = {}

    async def reconcile(self, store: ResourceStore) -> None:
        platform = self.node.platform
        if not platform.mode.manages_kernel:
            return
        documents = []
        if self.node.config is not None:
            from basalt.machinery.config.system import SysctlConfig

            documents = self.node.config.all(SysctlConfig)
        wanted = wanted_sysctls(documents)
        todo = {k: v for k, v in wanted.items() if self._written.get(k) != v}
        if not todo:
            return
        root = platform.system_root / "proc" / "sys"
        failed = await asyncio.to_thread(apply_sysctls, todo, root)
        for key, value in todo.items():
            if key not in failed:
                self._written[key] = value
                log.info("sysctl %s = %s", key, value)
        if failed:
            raise SysctlError(
                "sysctls not set: " + "; ".join(f"{k}: {r}" for k, r in sorted(failed.items()))
            )
