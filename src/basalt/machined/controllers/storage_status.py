"""Disks and Volumes: the machine's block devices, and Basalt's volumes with their usage,
read from sysfs, ``/proc/self/mountinfo`` and statvfs every half minute and whenever the
config changes. Read-only.

On metal the volumes are the partitions of docs/adr/0011-disk-layout.md found by GPT name
(on the disk the node booted from when there are several), and the partition types come
from reading each disk's GPT. In container mode the volumes are the node's state and
ephemeral directories; the disks are the host's as sysfs shows them (their tables are not
read: the host's devices are not the node's).
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from basalt.machinery.disk.names import BASE_NAMES, EPHEMERAL, STATE
from basalt.machinery.resources.specs import DiskPartition, DiskSpec, VolumeSpec

from ..runtime import ResourceStore
from ..storage.partitions import block_partitions, boot_disk
from .polling import PollingController

if TYPE_CHECKING:
    from ..node import Node


#: Seconds between two reads.
INTERVAL = 30.0
#: sysfs sizes count 512-byte sectors whatever the device's block size.
SECTOR = 512
_VIRTUAL_DISKS = ("loop", "ram", "zram")
_GPT_TYPES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "efi",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "linux-data",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "linux-swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "linux-lvm",
    "21686148-6449-6e6f-744e-656564454649": "bios-boot",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "microsoft-data",
}
#: Volumes in layout order (the ids of Volumes on metal).
VOLUMES = (*BASE_NAMES, STATE, EPHEMERAL)
_ESCAPE = re.compile(r"\\([0-7]{3})")


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _number(path: Path) -> int:
    try:
        return int(_text(path) or 0)
    except ValueError:
        return 0


def transport(name: str, device: Path) -> str:
    """How the disk is attached, from its name and where it sits in sysfs; '' unknown."""
    for prefix, kind in (("nvme", "nvme"), ("vd", "virtio"), ("mmcblk", "mmc"), ("xvd", "xen")):
        if name.startswith(prefix):
            return kind
    try:
        path = str(device.resolve())
    except OSError:
        return ""
    for marker, kind in (("/usb", "usb"), ("/ata", "sata"), ("/virtio", "virtio")):
        if marker in path:
            return kind
    return "scsi" if name.startswith("sd") else ""


def _gpt_types(device: Path) -> dict[str, str]:
    """GPT name -> partition type of the disk at ``device``; {} when unreadable."""
    from basalt.machinery.disk import gpt

    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        table = gpt.read(fd)
    except (OSError, gpt.GptError):
        return {}
    finally:
        os.close(fd)
    return {p.name: _GPT_TYPES.get(str(p.type_guid), str(p.type_guid)) for p in table.partitions}


def _partitions(disk: Path, types: dict[str, str]) -> list[DiskPartition]:
    found = []
    for entry in sorted(disk.iterdir()):
        if not (entry / "partition").exists():
            continue
        uevent = dict(line.partition("=")[::2] for line in _text(entry / "uevent").splitlines())
        label = uevent.get("PARTNAME", "")
        found.append(
            DiskPartition(
                name=entry.name,
                label=label,
                start=_number(entry / "start") * SECTOR,
                size=_number(entry / "size") * SECTOR,
                type=types.get(label, "") if label else "",
            )
        )
    return found


def read_disks(root: Path, *, read_tables: bool) -> dict[str, DiskSpec]:
    """Block devices under ``root``/sys/block by kernel name (no loop, ram, zram or empty
    ones); with ``read_tables`` each disk's GPT is read for the partition types."""
    sys_block = root / "sys" / "block"
    system = boot_disk(root / "sys" / "class" / "block", root / "proc" / "cmdline")
    try:
        names = sorted(entry.name for entry in sys_block.iterdir())
    except OSError:
        return {}
    disks = {}
    for name in names:
        device = sys_block / name
        sectors = _number(device / "size")
        if name.startswith(_VIRTUAL_DISKS) or not sectors:
            continue
        types = _gpt_types(root / "dev" / name) if read_tables else {}
        disks[name] = DiskSpec(
            device=f"/dev/{name}",
            size=sectors * SECTOR,
            model=_text(device / "device" / "model"),
            serial=_text(device / "device" / "serial") or _text(device / "serial"),
            rotational=_number(device / "queue" / "rotational") == 1,
            readonly=_number(device / "ro") == 1,
            transport=transport(name, device),
            system_disk=system == f"/dev/{name}",
            partitions=_partitions(device, types),
        )
    return disks


@dataclass(frozen=True)
class Mount:
    device: str
    """major:minor"""
    path: str
    filesystem: str
    source: str


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a ``/proc/<pid>/mountinfo`` text, in mount order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        if len(fields) < dash + 3:
            continue
        mounts.append(
            Mount(fields[2], _unescape(fields[4]), fields[dash + 1], _unescape(fields[dash + 2]))
        )
    return mounts


def mount_of(path: Path, mounts: list[Mount]) -> Mount | None:
    """The mount ``path`` is on: the last one whose mount point is its longest prefix."""
    best: Mount | None = None
    target = str(path)
    for mount in mounts:
        prefix = mount.path.rstrip("/") + "/"
        under = target == mount.path or target.startswith(prefix)
        if under and (best is None or len(mount.path) >= len(best.path)):
            best = mount
    return best


def tree_bytes(top: Path) -> int:
    """Bytes allocated to the files under ``top`` (like ``du -s``): symbolic links not
    followed, other filesystems not entered, each hard-linked file counted once."""
    try:
        device = top.lstat().st_dev
    except OSError:
        return 0
    total, seen, todo = 0, set(), [str(top)]
    while todo:
        try:
            entries = list(os.scandir(todo.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if info.st_dev != device:
                continue
            if stat.S_ISDIR(info.st_mode):
                todo.append(entry.path)
            elif info.st_nlink > 1:
                if info.st_ino in seen:
                    continue
                seen.add(info.st_ino)
            total += info.st_blocks * 512
    return total


def _usage(path: str) -> tuple[int, int, int]:
    """(size, used, free) of the filesystem mounted at ``path``; zeros when unreadable."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0, 0, 0
    size = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    return size, size - st.f_bfree * st.f_frsize, free


def _probe_filesystem(device: Path) -> str:
    """The filesystem on an unmounted partition, from its magic: squashfs, ext4, vfat."""
    try:
        with device.open("rb") as handle:
            head = handle.read(4096)
    except OSError:
        return ""
    if head[:4] == b"hsqs":
        return "squashfs"
    if head[1080:1082] == b"\x53\xef":
        return "ext4"
    if head[82:87] == b"FAT32" or head[54:59] in (b"FAT12", b"FAT16"):
        return "vfat"
    return ""


def metal_volumes(root: Path, mounts: list[Mount]) -> dict[str, VolumeSpec]:
    """Basalt's partitions by GPT name (the boot disk's first), with mounts and usage."""
    sys_class = root / "sys" / "class" / "block"
    system = boot_disk(sys_class, root / "proc" / "cmdline")
    parts = block_partitions(sys_class)
    parts.sort(key=lambda p: f"/dev/{p.disk}" != system)
    volumes: dict[str, VolumeSpec] = {}
    for part in parts:
        if part.name not in VOLUMES or part.name in volumes:
            continue
        number = _text(sys_class / part.device / "dev")
        mount = next((m for m in mounts if m.device == number), None)
        if mount is None:
            volumes[part.name] = VolumeSpec(
                device=f"/dev/{part.device}",
                filesystem=_probe_filesystem(root / "dev" / part.device),
                size=_number(sys_class / part.device / "size") * SECTOR,
            )
            continue
        size, used, free = _usage(mount.path)
        volumes[part.name] = VolumeSpec(
            device=f"/dev/{part.device}",
            path=mount.path,
            filesystem=mount.filesystem,
            mounted=True,
            size=size,
            used=used,
            free=free,
        )
    return volumes


def directory_volumes(paths: dict[str, Path], mounts: list[Mount]) -> dict[str, VolumeSpec]:
    """Container mode: each directory, the filesystem it is on, and the bytes under it."""
    volumes = {}
    for name, path in paths.items():
        mount = mount_of(path.resolve(), mounts)
        size, used, free = _usage(str(path))
        volumes[name] = VolumeSpec(
            device=mount.source if mount else "",
            path=str(path),
            filesystem=mount.filesystem if mount else "",
            mounted=mount is not None,
            size=size,
            used=used,
            free=free,
            contents=tree_bytes(path),
        )
    return volumes


class StorageStatusController(PollingController):
    """Publishes Disks and Volumes; never changes a disk."""

    name = "storage-status"
    #: A config applied is a config written to STATE: read again at once.
    inputs = ("MachineConfigs",)
    outputs = ("Disks", "Volumes")
    #: Reading the partition tables imports uuid (and platform): after a first boot's
    #: maintenance API opens, not before.
    after_api = True

    def __init__(self, node: Node, interval: float = INTERVAL) -> None:
        super().__init__(node, interval)

    def read(self) -> tuple[dict[str, DiskSpec], dict[str, VolumeSpec]]:
        """One reading of the disks and volumes (blocking)."""
        platform = self.node.platform
        root = platform.system_root
        on_metal = platform.mode.requires_install
        mounts = parse_mountinfo(_text(root / "proc" / "self" / "mountinfo"))
        disks = read_disks(root, read_tables=on_metal)
        if on_metal:
            volumes = metal_volumes(root, mounts)
        else:
            paths = self.node.paths
            volumes = directory_volumes({STATE: paths.state, EPHEMERAL: paths.ephemeral}, mounts)
        return disks, volumes

    async def refresh(self, store: ResourceStore) -> None:
        disks, volumes = await asyncio.to_thread(self.read)
        self.publish(store, "Disks", disks)
        self.publish(store, "Volumes", volumes)
