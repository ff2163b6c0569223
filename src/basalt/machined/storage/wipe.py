"""Wiping a disk Basalt does not use: which devices may be wiped, and the wipe itself.

The decision (:func:`check_wipe`) only reads sysfs and procfs below a root (:class:`Host`),
so tests run it against fake trees (``tests/fakes/blockdevs.py``). A device is refused,
with every reason found, when it is or belongs to:

- the system disk (the disk holding the booted slot ``BASALT-<slot>``, and with it the
  ESP, META, STATE and EPHEMERAL);
- a disk with a mounted partition, a partition held by another device (device mapper,
  md: ``holders/``), or a partition in use as swap; a partition of such a disk too;
- an attached loop device (one with a ``loop/backing_file``);
- a read-only device, or one without a medium (size 0).

The wipe (:func:`wipe`) opens the device exclusively (``O_EXCL`` on a block device: the
kernel refuses while anything mounts or claims it, a second check the sysfs reading
cannot race past). ``fast`` discards the device where supported and zeroes its first and
last MiB (the protective MBR, both GPT headers and most filesystem signatures); ``zeroes``
writes zeroes over all of it. Both fsync, and a whole disk then has the kernel re-read
its (now empty) partition table.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from basalt.machinery.disk.names import slot_partition
from basalt.machinery.errors import BasaltError, InvalidRequestError, NotFoundError

from .partitions import block_partitions, kernel_slot

WipeMethod = Literal["fast", "zeroes"]
MIB = 1 << 20
CHUNK = 4 * MIB
#: ioctls of linux/fs.h: _IO(0x12, 119) and _IO(0x12, 95).
BLKDISCARD = 0x1277
BLKRRPART = 0x125F
#: Devices that are never disks a node could wipe (RAM disks, compressed swap).
_NOT_DISKS = ("ram", "zram")


class DiskInUseError(BasaltError):
    """The device is one Basalt or the kernel uses: it is not wiped (nothing written)."""


class UnknownDiskError(NotFoundError):
    """No block device of that name on this node."""


class WipeError(BasaltError):
    """The wipe started and failed (an I/O error): the device may be partly wiped."""


@dataclass(frozen=True)
class Host:
    """Where a node's sysfs and procfs are: ``/`` on a node, a fake tree in tests."""

    root: Path = Path("/")

    @property
    def sys_block(self) -> Path:
        return self.root / "sys" / "class" / "block"

    @property
    def disks_dir(self) -> Path:
        return self.root / "sys" / "block"

    @property
    def mountinfo(self) -> Path:
        return self.root / "proc" / "self" / "mountinfo"

    @property
    def swaps(self) -> Path:
        return self.root / "proc" / "swaps"

    @property
    def cmdline(self) -> Path:
        return self.root / "proc" / "cmdline"


@dataclass(frozen=True)
class BlockDevice:
    """A block device as sysfs shows it: ``vdb1``, a partition of disk ``vdb``."""

    name: str
    disk: str
    partition: bool
    size: int
    read_only: bool
    dev: str

    @property
    def path(self) -> Path:
        return Path("/dev") / self.name


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def device_name(text: str) -> str:
    """``vdb`` from ``vdb`` or ``/dev/vdb``; InvalidRequestError for anything else."""
    name = text.strip().removeprefix("/dev/")
    if not name or "/" in name or name.startswith("."):
        raise InvalidRequestError(
            f"{text!r} is not a block device name",
            hint="name a disk as the node's kernel does, e.g. vdb or /dev/vdb "
            "(basaltctl get disks lists them)",
        )
    return name


def _device(name: str, host: Host) -> BlockDevice | None:
    entry = host.sys_block / name
    if not (entry / "dev").is_file():
        return None
    partition = (entry / "partition").exists()
    disk = entry.resolve().parent.name if partition else name
    size = int(_read(entry / "size") or 0) * 512
    return BlockDevice(
        name, disk, partition, size, _read(entry / "ro") == "1", _read(entry / "dev")
    )


def disks(host: Host) -> list[BlockDevice]:
    """The node's disks (whole devices with a medium), sorted by name."""
    try:
        names = sorted(p.name for p in host.disks_dir.iterdir())
    except OSError:
        return []
    found = []
    for name in names:
        device = _device(name, host)
        if device is not None and device.size > 0 and not name.startswith(_NOT_DISKS):
            found.append(device)
    return found


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def lookup(text: str, host: Host) -> BlockDevice:
    """The block device ``text`` names; UnknownDiskError listing the node's disks."""
    name = device_name(text)
    device = _device(name, host)
    if device is None:
        known = ", ".join(f"{d.name} ({_human(d.size)})" for d in disks(host)) or "none"
        raise UnknownDiskError(
            f"no block device {name!r} on this node (disks: {known})",
            hint="name one of the disks listed, or one of their partitions",
        )
    return device


def _members(disk: str, host: Host) -> list[str]:
    """The disk and its partitions (``vdb``, ``vdb1``, ...)."""
    directory = host.disks_dir / disk
    try:
        parts = sorted(p.name for p in directory.iterdir() if (p / "partition").exists())
    except OSError:
        parts = []
    return [disk, *parts]


def _mounts(host: Host) -> dict[str, str]:
    """``major:minor`` -> the first mount point of that device (``/proc/self/mountinfo``)."""
    found: dict[str, str] = {}
    for line in _read(host.mountinfo).splitlines():
        fields = line.split()
        if len(fields) > 4:
            found.setdefault(fields[2], fields[4].replace("\\040", " "))
    return found


def _swaps(host: Host) -> set[str]:
    """Names of the block devices in use as swap (``/proc/swaps``)."""
    names = set()
    for line in _read(host.swaps).splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].startswith("/dev/"):
            names.add(Path(fields[0]).name)
    return names


def _system_disk(host: Host) -> tuple[str, str] | None:
    """(disk, partition) of the booted slot ``BASALT-<slot>``, None without one."""
    slot = kernel_slot(host.cmdline)
    if not slot:
        return None
    for part in block_partitions(host.sys_block):
        if part.name == slot_partition(slot):
            return part.disk, part.device
    return None


def refusals(device: BlockDevice, host: Host) -> list[str]:
    """Every reason ``device`` must not be wiped; empty when it may be."""
    reasons: list[str] = []
    system = _system_disk(host)
    of_disk = f"a partition of {device.disk}, which" if device.partition else "it"
    if system is not None and system[0] == device.disk:
        slot = kernel_slot(host.cmdline)
        reasons.append(
            f"{of_disk} is the system disk: it holds the booted slot "
            f"{slot_partition(slot)} ({system[1]}), the ESP, META, STATE and EPHEMERAL"
        )
    mounts, swaps = _mounts(host), _swaps(host)
    for member in _members(device.disk, host):
        dev = _read(host.sys_block / member / "dev")
        if dev and dev in mounts:
            reasons.append(f"{member} is mounted on {mounts[dev]}")
        try:
            holders = sorted(p.name for p in (host.sys_block / member / "holders").iterdir())
        except OSError:
            holders = []
        if holders:
            reasons.append(f"{member} is held by {', '.join(holders)} (device mapper or md)")
        if member in swaps:
            reasons.append(f"{member} is in use as swap")
    backing = _read(host.sys_block / device.name / "loop" / "backing_file")
    if backing:
        reasons.append(f"{device.name} is a loop device attached to {backing}")
    if device.read_only:
        reasons.append(f"{device.name} is read-only")
    if device.size == 0:
        reasons.append(f"{device.name} has no medium (size 0)")
    return reasons


def check_wipe(text: str, host: Host) -> BlockDevice:
    """The device ``text`` names, when it may be wiped; DiskInUseError with every reason."""
    device = lookup(text, host)
    reasons = refusals(device, host)
    if reasons:
        raise DiskInUseError(
            f"/dev/{device.name} is not wiped: {'; '.join(reasons)}",
            hint="wipe only disks Basalt does not use; unmount or detach what uses it first "
            "(reset the node to wipe its system disk)",
        )
    return device


# -- the wipe ------------------------------------------------------------------------------------
Progress = Callable[[int, int], None]


def _zero(fd: int, start: int, end: int, progress: Progress | None = None) -> None:
    block = bytes(min(CHUNK, max(end - start, 0)))
    offset = start
    while offset < end:
        count = min(len(block), end - offset)
        written = os.pwrite(fd, memoryview(block)[:count], offset)
        offset += written
        if progress is not None:
            progress(offset - start, end - start)


def _discard(fd: int, size: int) -> bool:
    """BLKDISCARD over the device; False where it is not supported (or not a device)."""
    try:
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("=QQ", 0, size))
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOTSUP):
            return False
        raise
    return True


def _reread_partitions(fd: int) -> bool:
    try:
        fcntl.ioctl(fd, BLKRRPART)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL):
            return False
        raise
    return True


@dataclass(frozen=True)
class WipeResult:
    size: int
    method: WipeMethod
    discarded: bool
    reread: bool
    seconds: float

    def summary(self, name: str) -> str:
        done = "zeroed whole" if self.method == "zeroes" else "first and last MiB zeroed"
        discard = ", discarded" if self.discarded else ""
        return f"/dev/{name} wiped ({self.method}: {done}{discard}, {_human(self.size)})"


def wipe(
    path: Path, method: WipeMethod, *, whole_disk: bool, progress: Progress | None = None
) -> WipeResult:
    """Wipe ``path`` (a block device, or a file in tests) by ``method`` and fsync it."""
    started = time.monotonic()
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        if stat.S_ISBLK(os.stat(path).st_mode):
            flags |= os.O_EXCL  # refused by the kernel while mounted or claimed
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DiskInUseError(
                f"{path} is not wiped: the kernel refuses an exclusive open (it is in use)",
                hint="unmount or detach what uses it first",
            ) from None
        raise WipeError(f"{path}: opening failed: {exc.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        discarded = False
        if method == "fast":
            discarded = _discard(fd, size)
            _zero(fd, 0, min(MIB, size))
            _zero(fd, max(size - MIB, 0), size)
        else:
            _zero(fd, 0, size, progress)
        os.fsync(fd)
        reread = _reread_partitions(fd) if whole_disk else False
    except OSError as exc:
        raise WipeError(
            f"{path}: wiping failed ({method}): {exc.strerror}",
            hint="the device may be partly wiped; check it (dmesg) and run the wipe again",
        ) from None
    finally:
        os.close(fd)
    return WipeResult(size, method, discarded, reread, time.monotonic() - started)
