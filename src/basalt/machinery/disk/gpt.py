"""GUID partition tables (UEFI 2.10, section 5.3), read and written in pure Python.

A table is written as a protective MBR (LBA 0), the primary header (LBA 1) and its
partition entries (LBA 2-33), and at the disk's end the backup entries and the backup
header (last LBA). Both headers carry a CRC32 of themselves and of the entry array.
Partition names are UTF-16LE, at most 36 code units. GUIDs are stored mixed-endian
(``uuid.UUID.bytes_le``). Sectors are 512 bytes: Basalt's disks (virtio-blk, USB sticks,
SATA/NVMe in 512e mode) all present that logical size.

:func:`write` writes the backup copy first and the primary copy last, each followed by
an fsync: a reader (the kernel, the firmware, :func:`read`) that finds a torn primary
falls back to the complete backup, so replacing a table is as atomic as a disk allows.
"""

from __future__ import annotations

import itertools
import os
import struct
import uuid
import zlib
from dataclasses import dataclass, field, replace

from ..errors import BasaltError

__all__ = [
    "ESP_TYPE",
    "LINUX_DATA_TYPE",
    "SECTOR",
    "GptError",
    "Partition",
    "Table",
    "disk_size",
    "encode",
    "has_signature",
    "read",
    "write",
]

SECTOR = 512
MIB = 1024 * 1024
#: The EFI system partition.
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
#: Linux filesystem data; Basalt tells its partitions apart by name, not by type.
LINUX_DATA_TYPE = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")

SIGNATURE = b"EFI PART"
REVISION = 0x00010000
HEADER_SIZE = 92
ENTRY_COUNT = 128
ENTRY_SIZE = 128
#: Sectors the entry array takes: 128 entries of 128 bytes.
ENTRY_SECTORS = ENTRY_COUNT * ENTRY_SIZE // SECTOR
NAME_UNITS = 36

_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_ENTRY = struct.Struct("<16s16sQQQ72s")


class GptError(BasaltError):
    """A partition table cannot be read (both copies damaged) or cannot be written as asked."""


@dataclass(frozen=True)
class Partition:
    """One entry. ``first_lba`` and ``last_lba`` are inclusive, as on disk."""

    name: str
    type_guid: uuid.UUID
    guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int = 0

    @property
    def offset(self) -> int:
        return self.first_lba * SECTOR

    @property
    def size(self) -> int:
        return (self.last_lba - self.first_lba + 1) * SECTOR

    @property
    def end(self) -> int:
        """The byte just after the partition."""
        return (self.last_lba + 1) * SECTOR


@dataclass(frozen=True)
class Table:
    """A whole table for a disk of ``sectors`` logical sectors."""

    disk_guid: uuid.UUID
    sectors: int
    partitions: tuple[Partition, ...] = ()
    #: True when :func:`read` found the primary copy damaged and used the backup.
    from_backup: bool = field(default=False, compare=False)

    @property
    def first_usable(self) -> int:
        return 2 + ENTRY_SECTORS

    @property
    def last_usable(self) -> int:
        return self.sectors - 2 - ENTRY_SECTORS

    def find(self, name: str) -> Partition | None:
        """The partition named ``name`` (the first one, should there be several)."""
        return next((p for p in self.partitions if p.name == name), None)

    def index(self, name: str) -> int | None:
        """1-based partition number of ``name`` (the kernel's ``vda2`` is 2)."""
        for number, part in enumerate(self.partitions, start=1):
            if part.name == name:
                return number
        return None

    def free_start(self, align: int = MIB) -> int:
        """The first ``align``-aligned LBA after every partition."""
        used = max((p.last_lba + 1 for p in self.partitions), default=self.first_usable)
        step = align // SECTOR
        return -(-used // step) * step

    def resized(self, sectors: int) -> Table:
        """The same partitions on a disk of ``sectors`` (the backup moves to its end)."""
        return replace(self, sectors=sectors, from_backup=False)

    def add(
        self,
        name: str,
        size: int | None,
        *,
        guid: uuid.UUID,
        type_guid: uuid.UUID = LINUX_DATA_TYPE,
    ) -> Table:
        """Append a partition at :meth:`free_start`; ``size`` None takes the rest of the
        disk (its end rounded down to a MiB). Raises :class:`GptError` if it does not fit."""
        first = self.free_start()
        if size is None:
            step = MIB // SECTOR
            last = (self.last_usable + 1) // step * step - 1
        else:
            last = first + size // SECTOR - 1
        if last > self.last_usable or last < first:
            raise GptError(
                f"partition {name} ({_mib(size)}) does not fit: the disk has "
                f"{_mib((self.last_usable - first + 1) * SECTOR)} free after its last partition"
            )
        part = Partition(name, type_guid, guid, first, last)
        return replace(self, partitions=(*self.partitions, part), from_backup=False)

    def check(self) -> None:
        """Raise :class:`GptError` unless every partition is inside the usable area,
        none overlap, every name fits, and the disk holds the table."""
        if self.sectors < 2 * (2 + ENTRY_SECTORS) + 1:
            raise GptError(f"a disk of {self.sectors} sectors is too small for a GPT")
        if len(self.partitions) > ENTRY_COUNT:
            raise GptError(f"{len(self.partitions)} partitions; a GPT holds {ENTRY_COUNT}")
        spans = sorted(self.partitions, key=lambda p: p.first_lba)
        for part in spans:
            if len(part.name.encode("utf-16-le")) > 2 * NAME_UNITS:
                raise GptError(f"partition name {part.name!r} is longer than {NAME_UNITS} units")
            if not self.first_usable <= part.first_lba <= part.last_lba <= self.last_usable:
                raise GptError(
                    f"partition {part.name} (LBA {part.first_lba}-{part.last_lba}) is outside "
                    f"the usable area (LBA {self.first_usable}-{self.last_usable})"
                )
        for before, after in itertools.pairwise(spans):
            if after.first_lba <= before.last_lba:
                raise GptError(f"partitions {before.name} and {after.name} overlap")


def _mib(size: int | None) -> str:
    return "the rest" if size is None else f"{size / MIB:.0f} MiB"


# -- encoding -----------------------------------------------------------------------------------


def _entries(table: Table) -> bytes:
    out = bytearray(ENTRY_COUNT * ENTRY_SIZE)
    for number, part in enumerate(table.partitions):
        name = part.name.encode("utf-16-le").ljust(2 * NAME_UNITS, b"\0")
        _ENTRY.pack_into(
            out,
            number * ENTRY_SIZE,
            part.type_guid.bytes_le,
            part.guid.bytes_le,
            part.first_lba,
            part.last_lba,
            part.attributes,
            name,
        )
    return bytes(out)


def _header(table: Table, current: int, backup: int, entries_lba: int, entries_crc: int) -> bytes:
    def pack(crc: int) -> bytes:
        return _HEADER.pack(
            SIGNATURE,
            REVISION,
            HEADER_SIZE,
            crc,
            0,
            current,
            backup,
            table.first_usable,
            table.last_usable,
            table.disk_guid.bytes_le,
            entries_lba,
            ENTRY_COUNT,
            ENTRY_SIZE,
            entries_crc,
        )

    return pack(zlib.crc32(pack(0))).ljust(SECTOR, b"\0")


def _protective_mbr(sectors: int) -> bytes:
    mbr = bytearray(SECTOR)
    # One partition of type 0xEE covering the disk (or 2 TiB of it): CHS start 0/0/2,
    # CHS end the maximum, as the UEFI spec describes.
    struct.pack_into(
        "<B3sB3sII", mbr, 446, 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
        min(sectors - 1, 0xFFFFFFFF),
    )  # fmt: skip
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def encode(table: Table) -> tuple[bytes, bytes]:
    """(the first 34 sectors, the last 33 sectors) of a disk holding ``table``."""
    table.check()
    entries = _entries(table)
    crc = zlib.crc32(entries)
    last = table.sectors - 1
    primary = _protective_mbr(table.sectors) + _header(table, 1, last, 2, crc) + entries
    backup = entries + _header(table, last, 1, last - ENTRY_SECTORS, crc)
    return primary, backup


# -- I/O ----------------------------------------------------------------------------------------


def disk_size(fd: int) -> int:
    """Bytes of the open disk (a block device or an image file)."""
    return os.lseek(fd, 0, os.SEEK_END)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def write(fd: int, table: Table, *, sync: bool = True) -> None:
    """Write ``table`` to the open disk: the backup copy first, then the primary.

    The table must describe the disk's real size (see :meth:`Table.resized`)."""
    size = disk_size(fd)
    if size != table.sectors * SECTOR:
        raise GptError(
            f"the table is for {table.sectors * SECTOR} bytes but the disk has {size}",
            hint="resize the table to the disk first",
        )
    primary, backup = encode(table)
    _pwrite_all(fd, backup, size - len(backup))
    if sync:
        os.fsync(fd)
    _pwrite_all(fd, primary, 0)
    if sync:
        os.fsync(fd)


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise GptError(f"short read at byte {offset}: the disk ends early")
    return data


def _parse(fd: int, header_lba: int, sectors: int) -> Table:
    """The table whose header is at ``header_lba``; GptError when it is not valid."""
    raw = _pread(fd, SECTOR, header_lba * SECTOR)[:HEADER_SIZE]
    (sig, revision, size, crc, _, current, _backup, first, last, disk_guid, entries_lba,
     count, entry_size, entries_crc) = _HEADER.unpack(raw)  # fmt: skip
    if sig != SIGNATURE:
        raise GptError(f"no GPT header at LBA {header_lba}")
    check = raw[:16] + b"\0\0\0\0" + raw[20:]
    if size != HEADER_SIZE or zlib.crc32(check) != crc or current != header_lba:
        raise GptError(f"GPT header at LBA {header_lba} is damaged (CRC or size)")
    if revision >> 16 != 1 or entry_size != ENTRY_SIZE or not 0 < count <= 1024:
        raise GptError(f"GPT header at LBA {header_lba}: unsupported entry layout")
    entries = _pread(fd, count * entry_size, entries_lba * SECTOR)
    if zlib.crc32(entries) != entries_crc:
        raise GptError(f"GPT entries of the header at LBA {header_lba} are damaged (CRC)")
    parts = []
    for number in range(count):
        type_le, guid_le, p_first, p_last, attributes, name = _ENTRY.unpack_from(
            entries, number * ENTRY_SIZE
        )
        if type_le == bytes(16):
            continue
        text = name.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(
            Partition(
                text, uuid.UUID(bytes_le=type_le), uuid.UUID(bytes_le=guid_le), p_first, p_last,
                attributes,
            )
        )  # fmt: skip
    if not first <= last < sectors:
        raise GptError(f"GPT header at LBA {header_lba}: usable area outside the disk")
    return Table(uuid.UUID(bytes_le=disk_guid), sectors, tuple(parts))


def read(fd: int) -> Table:
    """The disk's table: the primary copy, or the backup when the primary is damaged.

    Raises :class:`GptError` when neither copy is valid (a blank disk included)."""
    sectors = disk_size(fd) // SECTOR
    try:
        return _parse(fd, 1, sectors)
    except GptError as primary_error:
        try:
            return replace(_parse(fd, sectors - 1, sectors), from_backup=True)
        except GptError:
            raise GptError(
                f"no valid GPT: {primary_error}, and no valid backup at the disk's end",
                hint="the disk is blank or not partitioned with a GPT",
            ) from None


def has_signature(fd: int) -> bool:
    """Whether the disk starts with anything but zeros in its first MiB (a table, a
    filesystem, a boot sector): a disk Basalt may not overwrite without ``install.wipe``."""
    size = min(MIB, disk_size(fd))
    return any(os.pread(fd, size, 0))
