"""Where a node keeps its A/B slots: slot directories in container mode; on metal, the
installed disk's partitions, ESP entries and META (when machined is PID 1 booted from it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from basalt.machinery.boot.slots import SlotDirectories

    from ..boot.metal_slots import MetalSlots
    from ..node import Node

log = logging.getLogger(__name__)


def slot_storage(node: Node) -> SlotDirectories | MetalSlots | None:
    """Slot directories in container mode; on metal, the disk's slots when machined is
    PID 1 booted from an installed Basalt disk; else None (upgrades are refused)."""
    from ..platform.metal import MetalPlatform

    platform = node.platform
    if platform.mode.in_container:
        from basalt.machinery.boot.slots import SlotDirectories

        return SlotDirectories.of_node(node.paths.root)
    if not isinstance(platform, MetalPlatform) or not platform.init:
        return None
    if platform.system_root != Path("/"):
        return None
    from ..storage.partitions import kernel_slot

    if not kernel_slot():
        return None  # not booted from a disk's slot (no basalt.slot=): from memory
    from ..boot.metal_slots import of_machine

    return of_machine(platform.system_root, node.paths.ephemeral)


def mount_efivarfs() -> None:
    from ..sys import efivars
    from ..sys.mount import MountError

    try:
        efivars.mount_efivarfs()
    except MountError as exc:
        log.warning("efivarfs not mounted (%s): LoaderBootCountPath cannot be read", exc)
