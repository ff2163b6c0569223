"""Where this machine's Basalt partitions are: GPT names as sysfs shows them, the disk
the node booted from (``basalt.slot=``), and the STATE and EPHEMERAL devices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from basalt.machinery.disk.names import EPHEMERAL, SLOTS, STATE, slot_partition

from ..sys.cmdline import CMDLINE, kernel_arg

SYS_BLOCK = Path("/sys/class/block")


@dataclass(frozen=True)
class BlockPartition:
    """A partition as sysfs shows it: ``vda2`` on disk ``vda``, GPT name ``BASALT-A``."""

    device: str
    disk: str
    name: str


def block_partitions(sys_block: Path = SYS_BLOCK) -> list[BlockPartition]:
    """Every partition with a GPT name (``PARTNAME=`` in its uevent), sorted by device."""
    found = []
    try:
        entries = sorted(sys_block.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            fields = dict(
                line.partition("=")[::2] for line in (entry / "uevent").read_text().splitlines()
            )
        except OSError:
            continue
        if fields.get("DEVTYPE") == "partition" and "PARTNAME" in fields:
            disk = entry.resolve().parent.name
            found.append(BlockPartition(entry.name, disk, fields["PARTNAME"]))
    return found


def find_partition(name: str, sys_block: Path = SYS_BLOCK) -> str | None:
    """``/dev/<device>`` of the partition named ``name`` (the first one), or None."""
    for part in block_partitions(sys_block):
        if part.name == name:
            return f"/dev/{part.device}"
    return None


def kernel_slot(cmdline: Path = CMDLINE) -> str:
    """``basalt.slot=`` of the kernel command line (``A``), '' when absent."""
    return kernel_arg("basalt.slot", cmdline).upper()


def boot_disk(sys_block: Path = SYS_BLOCK, cmdline: Path = CMDLINE) -> str | None:
    """``/dev/<disk>`` holding the booted slot's partition; None when the node did not
    boot from a Basalt disk (no ``basalt.slot=``, or no such partition)."""
    slot = kernel_slot(cmdline)
    if slot not in SLOTS:
        return None
    for part in block_partitions(sys_block):
        if part.name == slot_partition(slot):
            return f"/dev/{part.disk}"
    return None


def installed_devices(sys_block: Path = SYS_BLOCK) -> tuple[str | None, str | None]:
    """(STATE, EPHEMERAL) devices of this machine, None where there is none."""
    return find_partition(STATE, sys_block), find_partition(EPHEMERAL, sys_block)
