"""The names of Basalt's partitions (docs/adr/0011-disk-layout.md), without the tables.

Kept apart from :mod:`.layout` and :mod:`.gpt` (which bring ``uuid``, and through it the
``platform`` module): a node's boot looks its partitions up by these names before its
maintenance API opens, and under emulation every module on that path is paid for.
"""

from __future__ import annotations

__all__ = ["BASE_NAMES", "EFI", "EPHEMERAL", "META", "SLOTS", "STATE", "slot_partition"]

EFI = "EFI"
META = "META"
STATE = "STATE"
EPHEMERAL = "EPHEMERAL"
SLOTS = ("A", "B")


def slot_partition(slot: str) -> str:
    """``BASALT-A`` for slot ``A`` (or ``a``)."""
    return f"BASALT-{slot.upper()}"


#: The image's own partitions, in disk order (install adds STATE and EPHEMERAL).
BASE_NAMES = (EFI, *(slot_partition(s) for s in SLOTS), META)
