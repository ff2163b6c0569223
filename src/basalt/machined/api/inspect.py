"""The Containers, Stats, Cgroups, TimeCheck and DiskUsage RPCs of MachineService
(a mixin of MachineServicer)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..node import Node


class InspectMethods:
    node: Node
