"""Kernel modules on metal: KernelModuleConfig -> loaded from /lib/modules/RELEASE.

Each module is loaded once, with its dependencies first; one that is already loaded
or built in counts as loaded. A module that fails is reported by name as the
controller's error (and retried with the engine's backoff) while the others are
still loaded. Modules are never unloaded when the config drops them. In container
mode the host's kernel is not ours: nothing happens.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from basalt.machinery.errors import BasaltError

from ..runtime import Controller, ResourceStore
from ..sys.kmod import KernelModuleError, ModuleIndex, load_module

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)


class KernelModulesError(BasaltError):
    """Some kernel modules could not be loaded; the message names each one."""


class KernelModulesController(Controller):
    name = "kernel-modules"
    inputs = ("MachineConfigs",)

    def __init__(self, node: Node) -> None:
        self.node = node
        self._done: set[tuple[str, tuple[str, ...]]] = set()

    def index(self) -> ModuleIndex:
        root = self.node.platform.system_root
        return ModuleIndex(
            root / "lib" / "modules" / os.uname().release, sysfs=root / "sys" / "module"
        )

    async def reconcile(self, store: ResourceStore) -> None:
        if not self.node.platform.mode.manages_kernel:
            return
        documents = []
        if self.node.config is not None:
            from basalt.machinery.config.system import KernelModuleConfig

            documents = self.node.config.all(KernelModuleConfig)
        todo = [d for d in documents if (d.name, tuple(d.parameters)) not in self._done]
        if not todo:
            return
        index = self.index()
        failed = []
        for document in todo:
            try:
                loaded = await asyncio.to_thread(
                    load_module, document.name, document.parameters, index=index
                )
            except KernelModuleError as exc:
                failed.append(str(exc))
                continue
            self._done.add((document.name, tuple(document.parameters)))
            if loaded:
                log.info("loaded kernel modules: %s", ", ".join(loaded))
                self.node.events.publish(
                    "machine", f"kernel modules loaded: {', '.join(loaded)}", actor=self.name
                )
        if failed:
            raise KernelModulesError("; ".join(failed))
