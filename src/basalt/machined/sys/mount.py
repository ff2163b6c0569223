"""mount(2) and umount2(2) through libc, the pseudo filesystems an init mounts, and
read-only bind mounts.

Options are written as for mount(8) (``"ro,nosuid,mode=0755"``): :func:`parse_options`
splits them into MS_* flags and the filesystem-specific data string.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from basalt.machinery.errors import BasaltError

from ._libc import check, libc

__all__ = [
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "PSEUDO_FILESYSTEMS",
    "MountError",
    "MountPoint",
    "bind_read_only",
    "format_flags",
    "is_mounted",
    "mount",
    "mount_pseudo_filesystems",
    "mounted_from",
    "mounted_targets",
    "parse_mountinfo",
    "parse_options",
    "umount",
]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_FORCE = 1
MNT_DETACH = 2

#: mount(8) option -> (flags it sets, flags it clears).
_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0),
    "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0),
    "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0),
    "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0),
    "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "nosymfollow": (MS_NOSYMFOLLOW, 0),
    "noatime": (MS_NOATIME, 0),
    "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0),
    "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0),
    "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0),
    "lazytime": (MS_LAZYTIME, 0),
    "silent": (MS_SILENT, 0),
    "bind": (MS_BIND, 0),
    "rbind": (MS_BIND | MS_REC, 0),
    "remount": (MS_REMOUNT, 0),
    "move": (MS_MOVE, 0),
    "private": (MS_PRIVATE, 0),
    "rprivate": (MS_PRIVATE | MS_REC, 0),
    "slave": (MS_SLAVE, 0),
    "rslave": (MS_SLAVE | MS_REC, 0),
    "shared": (MS_SHARED, 0),
    "rshared": (MS_SHARED | MS_REC, 0),
    "unbindable": (MS_UNBINDABLE, 0),
    "defaults": (0, 0),
}

_FLAG_NAMES = (
    (MS_RDONLY, "ro"),
    (MS_NOSUID, "nosuid"),
    (MS_NODEV, "nodev"),
    (MS_NOEXEC, "noexec"),
    (MS_SYNCHRONOUS, "sync"),
    (MS_REMOUNT, "remount"),
    (MS_DIRSYNC, "dirsync"),
    (MS_NOSYMFOLLOW, "nosymfollow"),
    (MS_NOATIME, "noatime"),
    (MS_NODIRATIME, "nodiratime"),
    (MS_BIND, "bind"),
    (MS_MOVE, "move"),
    (MS_REC, "rec"),
    (MS_SILENT, "silent"),
    (MS_UNBINDABLE, "unbindable"),
    (MS_PRIVATE, "private"),
    (MS_SLAVE, "slave"),
    (MS_SHARED, "shared"),
    (MS_RELATIME, "relatime"),
    (MS_STRICTATIME, "strictatime"),
    (MS_LAZYTIME, "lazytime"),
)


class MountError(BasaltError):
    """A mount or unmount failed; the message names the target and the kernel's reason."""


def parse_options(options: str | Iterable[str]) -> tuple[int, str]:
    """``"ro,nosuid,mode=0755"`` -> ``(MS_RDONLY | MS_NOSUID, "mode=0755")``.

    Options later in the list win (``"ro,rw"`` is read-write); options that are not
    mount flags are passed to the filesystem, in their order.
    """
    items = options.split(",") if isinstance(options, str) else list(options)
    flags = 0
    data: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item in _OPTIONS:
            set_bits, clear_bits = _OPTIONS[item]
            flags = (flags & ~clear_bits) | set_bits
        else:
            data.append(item)
    return flags, ",".join(data)


def format_flags(flags: int) -> str:
    """MS_* bits as mount(8) words, e.g. ``"ro,nosuid"``; unknown bits in hex."""
    words = []
    for bit, name in _FLAG_NAMES:
        if flags & bit:
            words.append(name)
            flags &= ~bit
    if flags:
        words.append(hex(flags))
    return ",".join(words)


def mount(source: str, target: str | Path, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); raises :class:`MountError` naming the target and the kernel's reason."""
    where = os.fspath(target)
    result = libc().mount(
        source.encode(),
        where.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    try:
        check(result, where)
    except OSError as exc:
        opts = ",".join(x for x in (format_flags(flags), data) if x)
        raise MountError(
            f"mounting {source} ({fstype or 'no type'}) on {where}"
            f"{f' with {opts}' if opts else ''} failed: {exc.strerror}"
        ) from exc


def umount(target: str | Path, flags: int = 0) -> None:
    """umount2(2); ``flags`` may be :data:`MNT_DETACH` for a lazy unmount."""
    where = os.fspath(target)
    try:
        check(libc().umount2(where.encode(), ctypes.c_int(flags)), where)
    except OSError as exc:
        raise MountError(f"unmounting {where} failed: {exc.strerror}") from exc


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    out = []
    i = 0
    while i < len(field):
        digits = field[i + 1 : i + 4]
        if field[i] == "\\" and len(digits) == 3 and digits.isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[tuple[str, str, str]]:
    """``/proc/self/mountinfo`` -> ``[(mount point, fstype, source), ...]`` in mount order."""
    found = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        after = right.split()
        if not sep or len(fields) < 5 or len(after) < 2:
            continue
        found.append((_unescape(fields[4]), after[0], _unescape(after[1])))
    return found


def mounted_targets(mountinfo: Path = Path("/proc/self/mountinfo")) -> set[str]:
    """Every mount point of this mount namespace (empty when /proc is not mounted)."""
    try:
        return {target for target, _, _ in parse_mountinfo(mountinfo.read_text())}
    except OSError:
        return set()


def mounted_from(source: str, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Where the device ``source`` is mounted in this mount namespace (none: [])."""
    real = os.path.realpath(source)
    try:
        text = mountinfo.read_text()
    except OSError:
        return []
    return [
        target
        for target, _, device in parse_mountinfo(text)
        if device.startswith("/") and os.path.realpath(device) == real
    ]


def is_mounted(target: str | Path) -> bool:
    """Whether something is mounted on ``target`` (files, bind mounts included)."""
    path = os.path.realpath(target)
    targets = mounted_targets()
    if targets:
        return path in targets
    return os.path.ismount(path)  # /proc is not mounted yet: compare devices


@dataclass(frozen=True)
class MountPoint:
    """One mount: ``options`` as for mount(8)."""

    source: str
    target: str
    fstype: str
    options: str = ""

    def under(self, root: Path) -> Path:
        return root / self.target.lstrip("/")


#: What an init mounts before anything else, in this order.
PSEUDO_FILESYSTEMS: tuple[MountPoint, ...] = (
    MountPoint("proc", "/proc", "proc", "nosuid,nodev,noexec,relatime"),
    MountPoint("sysfs", "/sys", "sysfs", "nosuid,nodev,noexec,relatime"),
    MountPoint("devtmpfs", "/dev", "devtmpfs", "nosuid,mode=0755"),
    MountPoint("devpts", "/dev/pts", "devpts", "nosuid,noexec,mode=0620,ptmxmode=0666"),
    MountPoint("tmpfs", "/dev/shm", "tmpfs", "nosuid,nodev,mode=1777"),
    MountPoint("cgroup2", "/sys/fs/cgroup", "cgroup2", "nosuid,nodev,noexec,relatime"),
    MountPoint("tmpfs", "/run", "tmpfs", "nosuid,nodev,mode=0755"),
)


def mount_all(points: Iterable[MountPoint], root: Path = Path("/")) -> list[str]:
    """Mount each point below ``root`` that is not mounted yet; returns what was mounted.

    Missing mount points are created (they live on filesystems mounted just before,
    such as /dev/pts on the new devtmpfs). Already mounted targets are left alone, so
    this can follow an initramfs that mounted some of them.
    """
    mounted = []
    for point in points:
        target = point.under(root)
        if is_mounted(target):
            continue
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MountError(f"cannot create mount point {target}: {exc.strerror}") from exc
        flags, data = parse_options(point.options)
        mount(point.source, target, point.fstype, flags, data)
        mounted.append(str(target))
    return mounted


def mount_pseudo_filesystems(root: Path = Path("/")) -> list[str]:
    """proc, sys, devtmpfs on /dev, /dev/pts, /dev/shm, cgroup2, tmpfs on /run."""
    return mount_all(PSEUDO_FILESYSTEMS, root)


def bind_read_only(source: str | Path, target: str | Path, *, recursive: bool = False) -> None:
    """Make ``target`` show ``source`` (a file or a directory), read-only.

    A bind mount takes the flags of its source until remounted, so this binds and then
    remounts the bind read-only (nosuid, nodev, noexec). Writes to ``source`` stay
    visible through ``target``: for a file, write it in place (truncate and write),
    since a rename replaces the inode that the bind mount holds.
    """
    mount(os.fspath(source), target, "", MS_BIND | (MS_REC if recursive else 0))
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        mount("none", target, "", flags)
    except MountError:
        with contextlib.suppress(MountError):
            umount(target, MNT_DETACH)  # never leave a writable bind behind
        raise
