"""Basalt's disk layout (docs/adr/0011-disk-layout.md): names, sizes and the tables.

The image holds ``EFI`` (the ESP), ``BASALT-A`` and ``BASALT-B`` (raw squashfs root
slots; B is empty) and ``META`` (boot and upgrade state). Install adds ``STATE`` (ext4:
config and node identity, ``/system/state``) and ``EPHEMERAL`` (ext4, the rest of the
disk, ``/var``). Partitions are found by their GPT name, never by number.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from .gpt import ESP_TYPE, LINUX_DATA_TYPE, MIB, SECTOR, Partition, Table
from .names import BASE_NAMES, EFI, EPHEMERAL, META, SLOTS, STATE, slot_partition

__all__ = [
    "EFI",
    "EPHEMERAL",
    "LAYOUT",
    "META",
    "SLOTS",
    "STATE",
    "Layout",
    "slot_partition",
]


@dataclass(frozen=True)
class Layout:
    """Sizes in bytes, all whole MiB."""

    efi: int = 128 * MIB
    slot: int = 192 * MIB
    meta: int = 1 * MIB
    state: int = 100 * MIB
    #: The least EPHEMERAL install accepts: room for logs, etcd and container images.
    min_ephemeral: int = 512 * MIB
    #: Where the first partition starts (LBA 2048): the usual alignment.
    start: int = 1 * MIB

    @property
    def image_size(self) -> int:
        """Bytes of the disk image: the partitions, plus a MiB for the backup table."""
        return self.start + self.efi + 2 * self.slot + self.meta + MIB

    @property
    def min_disk(self) -> int:
        """The smallest disk install accepts."""
        return self.image_size + self.state + self.min_ephemeral

    def image_table(self, seed: str) -> Table:
        """EFI, BASALT-A, BASALT-B and META for the image. GUIDs derive from ``seed``
        (the image's content), so two builds of one image are byte for byte equal."""

        import hashlib  # the imager's and install's: not a node's start-up (libcrypto)

        def guid(what: str) -> uuid.UUID:
            digest = hashlib.sha256(f"{seed}/{what}".encode()).digest()
            return uuid.UUID(bytes=digest[:16], version=4)

        table = Table(guid("disk"), self.image_size // SECTOR)
        table = table.add(EFI, self.efi, guid=guid(EFI), type_guid=ESP_TYPE)
        for slot in SLOTS:
            name = slot_partition(slot)
            table = table.add(name, self.slot, guid=guid(name))
        return table.add(META, self.meta, guid=guid(META))

    def installed_table(self, image: Table, sectors: int) -> Table:
        """``image`` on a disk of ``sectors`` with STATE and EPHEMERAL added (fresh GUIDs)."""
        table = image.resized(sectors)
        table = table.add(STATE, self.state, guid=uuid.uuid4(), type_guid=LINUX_DATA_TYPE)
        return table.add(EPHEMERAL, None, guid=uuid.uuid4(), type_guid=LINUX_DATA_TYPE)

    def base_names(self) -> tuple[str, ...]:
        return BASE_NAMES


LAYOUT = Layout()


def describe(part: Partition) -> str:
    return f"{part.name} ({part.size // MIB} MiB at {part.offset // MIB} MiB)"
