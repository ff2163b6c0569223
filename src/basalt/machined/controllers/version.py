"""Versions/version: what Basalt this node runs."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from basalt.machinery.resources import VersionSpec

from ..extensions import schematic_record
from ..runtime import Controller, ResourceStore

if TYPE_CHECKING:
    from ..node import Node


class VersionController(Controller):
    name = "version"
    outputs = ("Versions",)

    def __init__(self, node: Node) -> None:
        self.node = node

    async def reconcile(self, store: ResourceStore) -> None:
        spec = VersionSpec(
            tag=self.node.version,
            python=sys.version.split()[0],
            platform=str(self.node.platform.mode),
            arch=self.node.platform.arch,
            schematic=schematic_record(self.node.platform.system_root).get("id", ""),
            extensions=[
                f"{e.manifest.name} {e.manifest.version}"
                for e in getattr(self.node.platform, "extensions", ())
            ],
            extensions_skipped=list(getattr(self.node.platform, "extensions_skipped", ())),
        )
        store.put("Versions", "version", spec, owner=self.name)
