"""A FAT16/FAT32 volume read from its device, and the one write a mounted vfat cannot do.

The ESP repair (:mod:`.esp_repair`) needs two things the kernel's vfat driver does not
give: each file's cluster chain (to see two names sharing one chain, or a name whose
clusters the FAT already counts as free), and a way to remove such a name *without*
freeing its clusters, since they belong to the other name. Removing a name through vfat
(``unlink``) frees its chain, which then gets reused under the surviving name.

So this module reads the boot sector, the active FAT and directories straight from the
device while the ESP is not mounted, and :meth:`FatVolume.erase` marks a directory
entry deleted (``0xE5``) the way a FAT driver does, but leaves the FAT alone: the short
entry first (the name is gone once that sector is written), then its long-name slots.
A cut between the two leaves long-name slots without a short entry, which every FAT
reader skips. Nothing else on the volume is written.
"""

from __future__ import annotations

import contextlib
import os
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from basalt.machinery.errors import BasaltError

_DIRENT = 32
_DELETED = 0xE5
_ATTR_LONG_NAME = 0x0F
_ATTR_VOLUME = 0x08
_ATTR_DIRECTORY = 0x10
_LOWER_BASE, _LOWER_EXT = 0x08, 0x10
#: How deep and how wide :meth:`FatVolume.walk` goes: an ESP holds a few dozen files.
_MAX_DEPTH = 8
_MAX_FILES = 10_000


class FatError(BasaltError):
    """The ESP is not a FAT16/FAT32 volume this reader understands, or reading it failed."""


@dataclass(frozen=True)
class FatFile:
    """One directory entry: its path (``/``-separated, as named), where it is on the
    volume (its short entry, its long-name slots) and its first cluster."""

    path: str
    size: int
    start: int
    is_dir: bool
    entry_offset: int
    name_slots: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


@dataclass(frozen=True)
class Chain:
    """A file's cluster chain: ``length`` clusters (as far as it could be followed) ending
    at ``end``, its last cluster or the first free, bad or out-of-range one (0: none).
    Chains that share any cluster share the rest too (each FAT word has one successor),
    so two files share clusters exactly when their chains have the same ``end``.
    ``problem`` says why it is not a whole, valid chain for the file's size."""

    length: int
    end: int
    problem: str | None = None


@dataclass(frozen=True)
class _Geometry:
    sector: int
    cluster: int
    fat_offset: int
    fat_bytes: int
    root_offset: int  # FAT16: the fixed root directory region
    root_bytes: int
    data_offset: int
    clusters: int
    fat32: bool
    root_cluster: int


def _geometry(boot: bytes, volume_size: int) -> _Geometry:
    if len(boot) < 512 or boot[510:512] != b"\x55\xaa":
        raise FatError("no FAT boot sector (signature 55 AA missing)")
    sector, per_cluster, reserved, fats, root_entries, total16 = struct.unpack_from(
        "<HBHBHH", boot, 11
    )
    fat16_size, total32, fat32_size = (
        struct.unpack_from("<H", boot, 22)[0],
        struct.unpack_from("<I", boot, 32)[0],
        struct.unpack_from("<I", boot, 36)[0],
    )
    if sector not in (512, 1024, 2048, 4096) or per_cluster == 0 or fats == 0:
        raise FatError(f"not a FAT boot sector ({sector}-byte sectors, {per_cluster}/cluster)")
    fat32 = fat16_size == 0  # as Linux decides: FAT32 keeps its FAT size elsewhere
    fat_sectors = fat32_size if fat32 else fat16_size
    total = total16 or total32
    root_bytes = root_entries * _DIRENT
    root_sectors = -(-root_bytes // sector)
    data_sector = reserved + fats * fat_sectors + root_sectors
    clusters = (total - data_sector) // per_cluster
    if clusters <= 0 or fat_sectors == 0:
        raise FatError(f"not a FAT boot sector ({clusters} clusters)")
    if not fat32 and clusters < 4085:
        raise FatError(f"FAT12 ({clusters} clusters) is not supported")
    active = 0
    if fat32:
        flags = struct.unpack_from("<H", boot, 40)[0]
        if flags & 0x80:  # mirroring off: only the active FAT is current
            active = flags & 0x0F
    if total * sector > volume_size or active >= fats:
        raise FatError(
            f"the boot sector describes {total * sector} bytes; the volume has {volume_size}"
        )
    return _Geometry(
        sector=sector,
        cluster=sector * per_cluster,
        fat_offset=(reserved + active * fat_sectors) * sector,
        fat_bytes=fat_sectors * sector,
        root_offset=(reserved + fats * fat_sectors) * sector,
        root_bytes=root_bytes,
        data_offset=data_sector * sector,
        clusters=clusters,
        fat32=fat32,
        root_cluster=struct.unpack_from("<I", boot, 44)[0] if fat32 else 0,
    )


def _short_name(raw: bytes, flags: int) -> str:
    base = raw[:8].rstrip(b" ")
    if base[:1] == b"\x05":  # a real 0xE5 first character, escaped
        base = b"\xe5" + base[1:]
    ext = raw[8:11].rstrip(b" ")
    base_text, ext_text = base.decode("cp437"), ext.decode("cp437")
    if flags & _LOWER_BASE:
        base_text = base_text.lower()
    if flags & _LOWER_EXT:
        ext_text = ext_text.lower()
    return f"{base_text}.{ext_text}" if ext_text else base_text


def _first_cluster(raw: bytes, fat32: bool) -> int:
    high, low = int.from_bytes(raw[20:22], "little"), int.from_bytes(raw[26:28], "little")
    return (high << 16 | low) & 0x0FFFFFFF if fat32 else low


def _checksum(raw: bytes) -> int:
    total = 0
    for byte in raw[:11]:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def _name_part(slot: bytes) -> str:
    units = slot[1:11] + slot[14:26] + slot[28:32]
    text = units.decode("utf-16-le", errors="replace")
    return text.split("\0", 1)[0]


class _LongName:
    """Long-name slots as they come, last part first, until their short entry."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.parts: list[str] = []
        self.offsets: list[int] = []
        self.expect = 0
        self.checksum = -1

    def add(self, slot: bytes, offset: int) -> None:
        order = slot[0]
        if order & 0x40:  # the last part: a new name starts
            self.reset()
            self.expect = order & 0x1F
            self.checksum = slot[13]
        elif order & 0x1F != self.expect or slot[13] != self.checksum:
            self.reset()
            return
        if self.expect == 0:
            return
        self.parts.insert(0, _name_part(slot))
        self.offsets.append(offset)
        self.expect -= 1

    def take(self, short: bytes) -> tuple[str | None, tuple[int, ...]]:
        """The long name and its slots' offsets, if they belong to ``short``."""
        complete = self.parts and self.expect == 0 and self.checksum == _checksum(short)
        found = ("".join(self.parts), tuple(self.offsets)) if complete else (None, ())
        self.reset()
        return found


class FatVolume:
    """A FAT16/FAT32 volume in ``fd`` at byte ``offset`` (0 for a partition device)."""

    def __init__(self, fd: int, offset: int = 0, size: int | None = None) -> None:
        self.fd = fd
        self.offset = offset
        if size is None:
            size = os.lseek(fd, 0, os.SEEK_END) - offset
        self.geometry = _geometry(self._read(0, 512), size)
        raw = self._read(self.geometry.fat_offset, self.geometry.fat_bytes)
        width = 4 if self.geometry.fat32 else 2
        self.fat = array("I" if self.geometry.fat32 else "H")
        self.fat.frombytes(raw[: len(raw) // width * width])
        if self.geometry.fat32:  # the top 4 bits of a FAT32 word are reserved
            self.mask, self.eoc, self.bad = 0x0FFFFFFF, 0x0FFFFFF8, 0x0FFFFFF7
        else:
            self.mask, self.eoc, self.bad = 0xFFFF, 0xFFF8, 0xFFF7

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, path: str | Path, *, writable: bool = False, offset: int = 0
    ) -> Iterator[FatVolume]:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise FatError(f"ESP {path}: {exc.strerror}") from None
        try:
            yield cls(fd, offset)
        except OSError as exc:
            raise FatError(f"ESP {path}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def _read(self, at: int, length: int) -> bytes:
        data = os.pread(self.fd, length, self.offset + at)
        if len(data) != length:
            raise FatError(f"short read at byte {self.offset + at} ({len(data)} of {length})")
        return data

    # -- clusters ------------------------------------------------------------------------------
    def chain(self, file: FatFile) -> Chain:
        """Follow ``file``'s chain; a file's length is checked against its size."""
        size = None if file.is_dir else file.size
        if file.start == 0:
            return Chain(0, 0, f"{size} bytes but no first cluster" if size else None)
        fat, mask, eoc, bad = self.fat, self.mask, self.eoc, self.bad
        last = min(self.geometry.clusters + 1, len(fat) - 1)
        cluster, length = file.start, 0
        while True:  # a plain loop: a kernel is tens of thousands of clusters
            if cluster < 2 or cluster > last:
                return Chain(length, cluster, f"cluster {cluster} is outside the volume")
            value = fat[cluster] & mask
            if value == 0:
                return Chain(length, cluster, f"cluster {cluster} is marked free in the FAT")
            if value == bad:
                return Chain(length, cluster, f"cluster {cluster} is marked bad")
            length += 1
            if value >= eoc:
                break
            if length > last:
                return Chain(length, cluster, "its chain loops")
            cluster = value
        if size is not None:
            need = -(-size // self.geometry.cluster)
            if length != need:
                return Chain(length, cluster, f"{length} clusters for {size} bytes (needs {need})")
        return Chain(length, cluster)

    def clusters(self, file: FatFile) -> list[int]:
        """``file``'s clusters, as far as its chain could be followed."""
        found, cluster = [], file.start
        for _ in range(self.chain(file).length):
            found.append(cluster)
            cluster = self.fat[cluster] & self.mask
        return found

    def _cluster_offset(self, cluster: int) -> int:
        return self.geometry.data_offset + (cluster - 2) * self.geometry.cluster

    def read(self, file: FatFile, limit: int = 1 << 20) -> bytes:
        """A file's content through its chain (as far as it goes), at most ``limit`` bytes."""
        size = min(file.size, limit)
        out = bytearray()
        for cluster in self.clusters(file):
            if len(out) >= size:
                break
            out += self._read(self._cluster_offset(cluster), self.geometry.cluster)
        return bytes(out[:size])

    # -- directories ---------------------------------------------------------------------------
    def _directory_slots(self, directory: FatFile | None) -> Iterator[tuple[int, bytes]]:
        """(volume offset, 32 bytes) of each slot of ``directory`` (None: the root)."""
        g = self.geometry
        if directory is None and not g.fat32:
            spans = [(g.root_offset, g.root_bytes)]
        else:
            directory = directory or FatFile("", 0, g.root_cluster, True, 0, ())
            clusters = self.clusters(directory)
            problem = self.chain(directory).problem
            if problem and not clusters:
                raise FatError(f"{directory.path or 'the root directory'}: {problem}")
            spans = [(self._cluster_offset(c), g.cluster) for c in clusters]
        for base, length in spans:
            data = self._read(base, length)
            for at in range(0, length, _DIRENT):
                yield base + at, data[at : at + _DIRENT]

    def listdir(self, directory: FatFile | None = None) -> list[FatFile]:
        """The entries of ``directory`` (None: the root), without ``.``, ``..`` and labels."""
        parent = f"{directory.path}/" if directory else ""
        found: list[FatFile] = []
        long_name = _LongName()
        for offset, raw in self._directory_slots(directory):
            if raw[0] == 0:
                break
            attributes = raw[11]
            if raw[0] == _DELETED:
                long_name.reset()
                continue
            if attributes & 0x3F == _ATTR_LONG_NAME:
                long_name.add(raw, offset)
                continue
            name, slots = long_name.take(raw)
            if attributes & _ATTR_VOLUME or raw[:2] in (b". ", b".."):
                continue
            is_dir = bool(attributes & _ATTR_DIRECTORY)
            start = _first_cluster(raw, self.geometry.fat32)
            size = struct.unpack_from("<I", raw, 28)[0]
            found.append(
                FatFile(
                    path=parent + (name or _short_name(raw[:11], raw[12])),
                    size=size,
                    start=start,
                    is_dir=is_dir,
                    entry_offset=offset,
                    name_slots=slots,
                )
            )
        return found

    def lookup(self, path: str) -> FatFile | None:
        """The entry at ``path`` (components matched case-insensitively, as FAT does)."""
        current: FatFile | None = None
        for part in [p for p in path.split("/") if p]:
            if current is not None and not current.is_dir:
                return None
            entries = self.listdir(current)
            current = next((e for e in entries if e.name.lower() == part.lower()), None)
            if current is None:
                return None
        return current

    def walk(self) -> list[FatFile]:
        """Every file and directory on the volume (directories before what they hold)."""
        found: list[FatFile] = []
        pending: list[tuple[FatFile | None, int]] = [(None, 0)]
        while pending:
            directory, depth = pending.pop()
            for entry in self.listdir(directory):
                found.append(entry)
                if len(found) > _MAX_FILES:
                    raise FatError(f"more than {_MAX_FILES} files: not an ESP Basalt made")
                if entry.is_dir and entry.start and depth < _MAX_DEPTH:
                    pending.append((entry, depth + 1))
        return found

    # -- the one write -------------------------------------------------------------------------
    def erase(self, file: FatFile) -> None:
        """Remove ``file``'s name without freeing its clusters: mark its short entry, then
        its long-name slots, deleted; each sector written and synced in that order."""
        current = self._read(file.entry_offset, _DIRENT)
        unchanged = (
            current[0] not in (0, _DELETED)
            and current[11] & 0x3F != _ATTR_LONG_NAME
            and _first_cluster(current, self.geometry.fat32) == file.start
            and struct.unpack_from("<I", current, 28)[0] == file.size
        )
        if not unchanged:
            raise FatError(f"{file.path}: its directory entry changed since it was read")
        sector = self.geometry.sector
        by_sector: dict[int, list[int]] = {}
        for offset in (file.entry_offset, *file.name_slots):
            by_sector.setdefault(offset // sector * sector, []).append(offset)
        first = file.entry_offset // sector * sector
        for base in [first, *sorted(b for b in by_sector if b != first)]:
            block = bytearray(self._read(base, sector))
            for offset in by_sector[base]:
                block[offset - base] = _DELETED
            os.pwrite(self.fd, bytes(block), self.offset + base)
            os.fsync(self.fd)
