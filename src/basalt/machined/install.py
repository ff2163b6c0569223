"""Install to disk: the first config of a metal node makes its disk a Basalt disk.

A node booted from Basalt's disk image (an entry whose kernel arguments carry
``basalt.slot=``) runs from its ``BASALT-<slot>`` partition. Applying the first config
in maintenance mode installs to ``MachineConfig.install.disk`` (docs/adr/0011):

(a) the disk it booted from: STATE and EPHEMERAL are added in the free space (a disk
    bigger than the image gets its backup table moved to its real end);
(b) another disk, blank (or ``install.wipe``): the same GPT with fresh GUIDs, EFI and
    BASALT-A copied byte for byte from the boot disk, META and BASALT-B cleared, then
    STATE and EPHEMERAL as in (a).

Everything is validated first (:func:`plan_install`): a bad disk changes nothing, and
the error names the field and what to do. Then (:func:`execute`): STATE (ext4, holding
``config.yaml``) and EPHEMERAL (ext4) are made in files on /run with ``mke2fs`` and
their written extents copied into place, outside every partition the current table
lists; last, the new GPT is written, backup copy first. Until that last write the disk
reads as before, so a power cut boots back into maintenance mode; after it, the node
boots installed with its config. Formatting in files also works while the disk's
BASALT-A is mounted as the root (mke2fs refuses a busy disk).

Only machined as PID 1 on the metal platform, booted from a Basalt disk, installs
(:func:`install_target`); a metal node started any other way (a namespace test, a
direct-kernel boot of ``root.sqfs``) keeps running from RAM and says so.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from basalt.machinery.disk import gpt
from basalt.machinery.disk.layout import (
    EFI,
    EPHEMERAL,
    LAYOUT,
    META,
    STATE,
    Layout,
    slot_partition,
)
from basalt.machinery.errors import BasaltError

from .storage.partitions import block_partitions, boot_disk

if TYPE_CHECKING:
    from basalt.machinery.config import ConfigBundle

    from .node import Node

log = logging.getLogger(__name__)

FIELD = "MachineConfig.install.disk"
MKE2FS = "/usr/sbin/mke2fs"
#: The committed config's name on STATE (basalt.machined.storage.state.COMMITTED).
CONFIG_NAME = "config.yaml"
_CHUNK = 1 << 20
MIB = 1 << 20


class InstallError(BasaltError):
    """Install to disk was refused (bad ``install.disk``, wrong platform) or failed.

    A refusal changes nothing on any disk; the message names the field and what to do."""


def install_target(node: Node) -> str | None:
    """The boot disk when this node can install (PID 1, metal, booted from a Basalt
    disk), else None: it then runs from RAM as before."""
    from .platform.metal import MetalPlatform

    platform = node.platform
    if not isinstance(platform, MetalPlatform) or not platform.init:
        return None
    if platform.system_root != Path("/"):
        return None
    return boot_disk()


# -- the plan: every check before anything is written ---------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What :func:`execute` will write. ``source`` is the disk the node booted from."""

    target: str
    source: str
    table: gpt.Table
    #: (source partition, target partition) copied byte for byte: case (b) only.
    copies: tuple[tuple[gpt.Partition, gpt.Partition], ...] = ()
    #: Partitions whose first MiB is zeroed: case (b) only (META, BASALT-B).
    clears: tuple[gpt.Partition, ...] = ()
    wipe: bool = False
    #: ``install.extraKernelArgs``, added to the boot entries on the target's ESP.
    kernel_args: tuple[str, ...] = ()

    @property
    def same_disk(self) -> bool:
        return not self.copies

    def describe(self) -> str:
        parts = ", ".join(f"{p.name} {p.size // MIB} MiB" for p in self.table.partitions)
        how = "in its free space" if self.same_disk else f"copied from {self.source}"
        return f"{self.target}: {parts} ({how})"


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise InstallError(
            f"{FIELD}: cannot open {path}: {exc.strerror}", hint="name a disk of this node"
        ) from None


def _table(path: str) -> gpt.Table | None:
    fd = _open(path, os.O_RDONLY)
    try:
        return gpt.read(fd)
    except gpt.GptError:
        return None
    finally:
        os.close(fd)


def _size_and_signature(path: str) -> tuple[int, bool]:
    fd = _open(path, os.O_RDONLY)
    try:
        return gpt.disk_size(fd), gpt.has_signature(fd)
    finally:
        os.close(fd)


def plan_install(
    disk: str | None,
    wipe: bool,
    source: str,
    *,
    layout: Layout = LAYOUT,
    block_devices_only: bool = True,
    kernel_args: tuple[str, ...] = (),
) -> Plan:
    """Check ``install.disk`` against this node's disks; raise :class:`InstallError`
    naming what is wrong, having written nothing. ``source`` is the boot disk."""
    if not disk:
        raise InstallError(
            f"{FIELD} is not set: a metal node installs to a disk",
            hint="set it with 'gen config --install-disk /dev/vda' or a patch on install.disk",
        )
    target = os.path.realpath(disk)
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        raise InstallError(
            f"{FIELD}: {disk} does not exist on this node",
            hint="list this node's disks with 'basaltctl disks --insecure -n NODE' and "
            "apply a config naming one of them",
        ) from None
    if block_devices_only and not stat.S_ISBLK(mode):
        raise InstallError(
            f"{FIELD}: {disk} is not a block device", hint="name a whole disk, e.g. /dev/vda"
        )
    if (
        os.path.basename(target)[-1:].isdigit()
        and Path(f"/sys/class/block/{os.path.basename(target)}/partition").exists()
    ):
        raise InstallError(
            f"{FIELD}: {disk} is a partition; Basalt installs to a whole disk",
            hint="name the disk itself, e.g. /dev/vda rather than /dev/vda1",
        )
    image = _table(source)
    missing = [n for n in (EFI, slot_partition("A")) if image is None or image.find(n) is None]
    if image is None or missing:
        raise InstallError(
            f"the boot disk {source} has no Basalt layout ({', '.join(missing)} missing)",
            hint="boot the node from Basalt's disk image (disk.raw) and apply again",
        )
    size, signature = _size_and_signature(target)
    if size < layout.min_disk:
        raise InstallError(
            f"{FIELD}: {disk} has {size // MIB} MiB; Basalt needs at least "
            f"{layout.min_disk // MIB} MiB (image {layout.image_size // MIB} MiB, STATE "
            f"{layout.state // MIB} MiB, EPHEMERAL at least {layout.min_ephemeral // MIB} MiB)",
            hint="give the node a bigger disk, or name another one",
        )
    sectors = size // gpt.SECTOR
    base = replace(
        image, partitions=tuple(p for p in image.partitions if p.name not in (STATE, EPHEMERAL))
    )
    if target == os.path.realpath(source):
        installed = [n for n in (STATE, EPHEMERAL) if image.find(n) is not None]
        if installed and not wipe:
            raise InstallError(
                f"{FIELD}: {disk} is installed already (it has {' and '.join(installed)})",
                hint="set install.wipe: true to format STATE and EPHEMERAL again "
                "(the stored config and node identity are lost)",
            )
        table = _with_state(layout, base, sectors, disk)
        return Plan(target, source, table, wipe=wipe, kernel_args=kernel_args)
    if signature and not wipe:
        existing = _table(target)
        what = (
            "a partition table (" + ", ".join(p.name or "?" for p in existing.partitions) + ")"
            if existing is not None
            else "data in its first MiB"
        )
        raise InstallError(
            f"{FIELD}: {disk} is not blank: it holds {what}",
            hint="set install.wipe: true to overwrite it, or name a blank disk",
        )
    fresh = gpt.Table(
        uuid.uuid4(), base.sectors, tuple(replace(p, guid=uuid.uuid4()) for p in base.partitions)
    )
    table = _with_state(layout, fresh, sectors, disk)
    pairs = zip(base.partitions, fresh.partitions, strict=True)
    copies = tuple((old, new) for old, new in pairs if new.name in (EFI, slot_partition("A")))
    clears = tuple(p for p in fresh.partitions if p.name in (META, slot_partition("B")))
    return Plan(target, source, table, copies, clears, wipe, kernel_args)


def _with_state(layout: Layout, base: gpt.Table, sectors: int, disk: str) -> gpt.Table:
    try:
        return layout.installed_table(base, sectors)
    except gpt.GptError as exc:
        raise InstallError(
            f"{FIELD}: {disk}: {exc}", hint="give the node a bigger disk, or name another one"
        ) from None


# -- execution ------------------------------------------------------------------------------------


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, size: int) -> None:
    done = 0
    while done < size:
        block = os.pread(src, min(_CHUNK, size - done), src_offset + done)
        if not block:
            raise InstallError(f"the boot disk ended early at byte {src_offset + done}")
        _pwrite_all(dst, block, dst_offset + done)
        done += len(block)


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the parts of a sparse file that hold data."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size) - start
        offset = end


def make_ext4(
    image: Path, size: int, label: str, content: Path | None = None, mke2fs: str = MKE2FS
) -> None:
    """An ext4 filesystem of ``size`` bytes in the sparse file ``image``.

    Inode tables and the journal are left for the kernel to initialise (lazy init, as
    for any fresh disk), so only metadata is written and copied."""
    with image.open("wb") as stream:
        stream.truncate(size)
    argv = [mke2fs, "-t", "ext4", "-L", label, "-F", "-q", "-b", "4096"]
    argv += ["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
    if content is not None:
        argv += ["-d", str(content)]
    argv.append(str(image))
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise InstallError(f"mke2fs {label}: cannot run {mke2fs}: {exc.strerror}") from None
    if done.returncode != 0:
        raise InstallError(
            f"mke2fs {label} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"
        )


def _place(image: Path, fd: int, part: gpt.Partition) -> None:
    """Copy the data of ``image`` into ``part`` of the disk open as ``fd``."""
    with image.open("rb") as stream:
        src = stream.fileno()
        size = os.fstat(src).st_size
        if size > part.size:
            raise InstallError(f"{part.name}: {size} bytes do not fit in {part.size}")
        for start, length in _extents(src, size):
            _copy_range(src, fd, start, part.offset + start, length)


def execute(plan: Plan, config: str, workdir: Path, *, mke2fs: str = MKE2FS) -> None:
    """Write the disk as ``plan`` says; the new partition table is the last write."""
    state = plan.table.find(STATE)
    ephemeral = plan.table.find(EPHEMERAL)
    assert state is not None and ephemeral is not None
    work = Path(tempfile.mkdtemp(prefix="install-", dir=workdir))
    target = _open(plan.target, os.O_RDWR)
    try:
        if not plan.same_disk:
            # The disk must read as blank until the new table is written: clear any old one.
            _pwrite_all(target, bytes(MIB), 0)
            _pwrite_all(target, bytes(MIB), gpt.disk_size(target) - MIB)
            source = _open(plan.source, os.O_RDONLY)
            try:
                for old, new in plan.copies:
                    _copy_range(source, target, old.offset, new.offset, min(old.size, new.size))
            finally:
                os.close(source)
            for part in plan.clears:
                _pwrite_all(target, bytes(min(MIB, part.size)), part.offset)
        content = work / "state"
        content.mkdir(mode=0o700)
        (content / CONFIG_NAME).write_text(config, encoding="utf-8")
        os.chmod(content / CONFIG_NAME, 0o600)
        for part, label, tree in ((state, STATE, content), (ephemeral, EPHEMERAL, None)):
            image = work / f"{label}.img"
            make_ext4(image, part.size, label, tree, mke2fs)
            _place(image, target, part)
            image.unlink()
        os.fsync(target)
        if plan.kernel_args:  # through another device: the copies above are synced
            _add_kernel_args(plan, workdir / "install-esp")
        gpt.write(target, plan.table)  # the commit point: backup copy, fsync, primary, fsync
    finally:
        os.close(target)
        shutil.rmtree(work, ignore_errors=True)
    log.info("installed: %s", plan.describe())


def _add_kernel_args(plan: Plan, mountpoint: Path) -> None:
    """``install.extraKernelArgs`` into the boot entries on the target's ESP (mounted
    through its partition on the boot disk, through a loop device on another disk)."""
    from .boot.install_entries import EntryEditError, edit_entries, mounted_esp
    from .sys.loop import LoopError
    from .sys.mount import MountError

    esp = plan.table.find(EFI)
    assert esp is not None
    if plan.same_disk:
        disk = os.path.basename(plan.target)
        found = [p.device for p in block_partitions() if p.disk == disk and p.name == EFI]
        if not found:
            raise InstallError(f"{plan.target} has no partition named {EFI} the kernel knows")
        where = mounted_esp(f"/dev/{found[0]}", mountpoint)
    else:
        where = mounted_esp(plan.target, mountpoint, offset=esp.offset, size=esp.size)
    try:
        with where as root:
            names = edit_entries(root, plan.kernel_args)
    except EntryEditError as exc:
        raise InstallError(f"MachineConfig.install.extraKernelArgs: {exc}", hint=exc.hint) from None
    except (LoopError, MountError, OSError) as exc:
        raise InstallError(
            f"MachineConfig.install.extraKernelArgs: the ESP of {plan.target}: {exc}"
        ) from None
    log.info("kernel arguments %s added to %s", " ".join(plan.kernel_args), ", ".join(names))


# -- in the node ----------------------------------------------------------------------------------


async def install_first_config(node: Node, bundle: ConfigBundle, source: str) -> Plan:
    """Maintenance mode's apply-config on an installable node: plan, then install
    ``bundle`` as STATE's config. The boot's install phase then reboots."""
    from basalt.machinery.config import MachineConfig

    from .platform.metal import MetalPlatform

    platform = node.platform
    if not isinstance(platform, MetalPlatform) or not platform.init:
        raise InstallError(
            "install to disk runs only as PID 1 on the metal platform",
            hint="boot the machine from Basalt's disk image",
        )
    if platform.installing or platform.installed_to:
        raise InstallError("an install is running or done already; wait for the reboot")
    machine = bundle.first(MachineConfig)
    disk, wipe = (machine.install.disk, machine.install.wipe) if machine else (None, False)
    kernel_args = tuple(machine.install.extra_kernel_args) if machine else ()
    platform.installing = True
    try:
        plan = await asyncio.to_thread(
            functools.partial(plan_install, disk, wipe, source, kernel_args=kernel_args)
        )
        node.events.publish("install", f"installing to {plan.describe()}", actor="apply-config")
        workdir = platform.system_root / "run" / "basalt"
        workdir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(execute, plan, bundle.to_yaml(), workdir)
    finally:
        platform.installing = False
    platform.installed_to = plan.target
    node.events.publish("install", f"installed to {plan.target}", actor="apply-config")
    return plan


#: What a metal node says when it did not boot from a Basalt disk.
NOT_FROM_DISK = (
    "not booted from a Basalt disk (no basalt.slot= on the kernel command line): "
    "nothing to install, running from RAM"
)


async def boot_phase(node: Node) -> None:
    """The boot's install phase on metal: reboot into a fresh install, carry on when
    running installed, say so when running from RAM."""
    from .platform.metal import MetalPlatform

    platform = node.platform
    if isinstance(platform, MetalPlatform) and platform.installed_to:
        message = f"installed to {platform.installed_to}; rebooting into the installed system"
        node.events.publish("install", message, actor="boot", disk=platform.installed_to)
        log.info("%s", message)
        node.finish("reboot")
        await asyncio.Future()  # the node restarts; nothing else of this boot runs
    if isinstance(platform, MetalPlatform) and platform.state_device:
        return
    machine = node.machine
    disk = (machine.install.disk if machine is not None else None) or "no install.disk"
    node.events.publish("install", f"{NOT_FROM_DISK} ({disk} left untouched)", actor="boot")
    log.warning("%s; %s left untouched", NOT_FROM_DISK, disk)
