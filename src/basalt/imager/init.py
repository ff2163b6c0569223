"""Basalt's initramfs init: load the block and filesystem modules, mount the squashfs
root read-only, switch to it and run its ``/sbin/init`` (see docs/adr/0006-initramfs.md).

This file is copied as ``/init`` into the initramfs, behind ``#!/usr/bin/python3.11 -IS``.
It mounts ``/proc``, ``/sys`` and ``devtmpfs``, loads the kernel modules listed in
``/etc/basalt/modules.load`` (virtio transports and block, squashfs) with
``finit_module``, mounts the squashfs root read-only, frees the initramfs, moves the
API filesystems over, switches root (``MS_MOVE`` + ``chroot``) and runs ``/sbin/init`` in
this same interpreter (:func:`hand_over`; no second Python start).

The root's ``/sbin/init`` is machined itself on the metal platform (the same as
``python3.11 -m basalt.machined --platform metal``; see docs/adr/0008-metal-pid1.md):
it mounts what else it needs, loads the root's modules (virtio-net), reaps, handles power
and configures the network by DHCP. Nothing here touches the network.

The root is the partition named ``BASALT-<slot>`` (GPT PARTNAME, as the kernel reports
it in ``/sys/class/block/*/uevent``) for ``basalt.slot=<slot>``, which a boot entry of
the disk image passes; without ``basalt.slot=`` it is the device ``basalt.root=``
(default ``/dev/vda``: a direct-kernel boot with ``root.sqfs`` as a raw drive).

Only the standard library is used, and only what the initramfs holds (``os``, ``sys``,
``time``, ``ctypes``). Kernel arguments: ``basalt.slot=``, ``basalt.root=``.
"""

from __future__ import annotations

import ctypes
import os
import time

INITRD_MARKER = "/etc/initrd-release"
INITRD_MODULES = "/etc/basalt/modules.load"
NEW_ROOT = "/sysroot"
#: The root's init: machined (see basalt.imager.rootfs.INIT_SCRIPT).
INIT = "/sbin/init"
DEFAULTS = {"root": "/dev/vda"}
SYS_BLOCK = "/sys/class/block"
#: How long block devices get to appear (virtio-pci probing is slow under TCG).
DEVICE_TIMEOUT = 10.0

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_MOVE = 0x1, 0x2, 0x4, 0x8, 0x2000
_SYS_FINIT_MODULE = 313  # x86_64
_EEXIST, _EBUSY = 17, 16

_libc = ctypes.CDLL(None, use_errno=True)


def log(message: str) -> None:
    """One line on the console, stamped with the kernel's uptime (CLOCK_BOOTTIME, what
    /proc/uptime shows: readable after /proc moved away too)."""
    uptime = time.clock_gettime(time.CLOCK_BOOTTIME)
    print(f"[{uptime:8.2f}] basalt-init: {message}", flush=True)


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    """mount(2); an already mounted target (EBUSY) is not an error."""
    os.makedirs(target, exist_ok=True)
    fs = fstype.encode() if fstype else None
    if _libc.mount(source.encode(), target.encode(), fs, flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        if err != _EBUSY:
            raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def load_modules(listing: str) -> int:
    """finit_module(2) every ``.ko`` path in ``listing`` (one a line, in order)."""
    try:
        with open(listing) as stream:
            paths = [line.strip() for line in stream if line.strip()]
    except FileNotFoundError:
        return 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.syscall(_SYS_FINIT_MODULE, fd, b"", 0) != 0:
                err = ctypes.get_errno()
                if err != _EEXIST:
                    raise OSError(err, f"load {path}: {os.strerror(err)}")
        finally:
            os.close(fd)
    return len(paths)


def parse_kernel_args(cmdline: str) -> dict[str, str]:
    """``basalt.KEY=VALUE`` words of a kernel command line over :data:`DEFAULTS`."""
    args = dict(DEFAULTS)
    for word in cmdline.split():
        key, sep, value = word.partition("=")
        if sep and key.startswith("basalt."):
            args[key.removeprefix("basalt.")] = value
    return args


def kernel_args() -> dict[str, str]:
    with open("/proc/cmdline") as stream:
        return parse_kernel_args(stream.read())


def mount_api_filesystems() -> None:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")


def wait_for(path: str, timeout: float) -> None:
    """Until ``path`` exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not ready within {timeout:.0f} s")
        time.sleep(0.01)


def partition_by_name(name: str, sys_block: str = SYS_BLOCK) -> str | None:
    """``/dev/<dev>`` of the partition whose GPT name is ``name``, None if none is there."""
    try:
        devices = sorted(os.listdir(sys_block))
    except FileNotFoundError:
        return None
    for device in devices:
        try:
            with open(f"{sys_block}/{device}/uevent") as stream:
                lines = stream.read().splitlines()
        except OSError:
            continue
        if f"PARTNAME={name}" in lines:
            return f"/dev/{device}"
    return None


def find_root(args: dict[str, str], timeout: float) -> str:
    """The root's device: the slot's partition by name, else ``basalt.root=``."""
    slot = args.get("slot", "")
    if not slot:
        wait_for(args["root"], timeout)
        return args["root"]
    name = f"BASALT-{slot.upper()}"
    deadline = time.monotonic() + timeout
    while (device := partition_by_name(name)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no partition named {name} (basalt.slot={slot}) within {timeout:.0f} s"
            )
        time.sleep(0.01)
    wait_for(device, timeout)
    return device


def _free_initramfs(path: str, device: int) -> int:
    """Delete the initramfs' files (they hold RAM), staying on its own filesystem; return
    how many were deleted."""
    count = 0
    for entry in os.scandir(path):
        full = entry.path
        if full == NEW_ROOT or entry.stat(follow_symlinks=False).st_dev != device:
            continue
        if entry.is_dir(follow_symlinks=False):
            count += _free_initramfs(full, device)
            os.rmdir(full)
        else:
            os.unlink(full)
        count += 1
    return count


#: The image's system extensions and schematic record, from the initramfs' second segment
#: (basalt/imager/extensions.py), and where they go on the new root: a tmpfs, read-only
#: once filled, on which machined mounts each extension (basalt/machined/extensions.py).
EXTENSIONS_SOURCE = "/extensions"
EXTENSIONS_TARGET = "/usr/lib/basalt/extensions"
_MS_REMOUNT = 0x20
_COPY_CHUNK = 1 << 20


def install_extensions(source: str, target: str) -> int:
    """Move the files of ``source`` to a new tmpfs on ``target``, with an empty directory
    for each ``NAME.sqfs``; make it read-only; return how many files moved."""
    if not os.path.isdir(source) or not os.path.isdir(target):
        return 0
    flags = MS_NOSUID | MS_NODEV
    mount("tmpfs", target, "tmpfs", flags, "mode=0755")
    names = sorted(os.listdir(source))
    for name in names:
        _copy(f"{source}/{name}", f"{target}/{name}")
        os.unlink(f"{source}/{name}")  # the initramfs copy holds RAM too
        if name.endswith(".sqfs"):
            os.mkdir(f"{target}/{name[: -len('.sqfs')]}", 0o755)
    mount("tmpfs", target, None, _MS_REMOUNT | MS_RDONLY | flags)
    return len(names)


def _copy(source: str, target: str) -> None:
    reader = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    writer = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        while chunk := os.read(reader, _COPY_CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(writer, view) :]
    finally:
        os.close(writer)
        os.close(reader)


def initrd_stage() -> list[str]:
    """Find the root, mount it read-only, switch to it; return how to start its init."""
    mount_api_filesystems()
    log("initramfs: started")
    log(f"initramfs: loaded {load_modules(INITRD_MODULES)} modules")
    args = kernel_args()
    root = find_root(args, DEVICE_TIMEOUT)
    mount(root, NEW_ROOT, "squashfs", MS_RDONLY | MS_NODEV)
    moved = install_extensions(EXTENSIONS_SOURCE, NEW_ROOT + EXTENSIONS_TARGET)
    log(f"initramfs: mounted {root} read-only ({moved} extension files); switching root")
    for api in ("/dev", "/proc", "/sys"):
        mount(api, NEW_ROOT + api, None, MS_MOVE)
    freed = _free_initramfs("/", os.lstat("/").st_dev)
    log(f"initramfs: freed {freed} files; starting {INIT}")
    os.chdir(NEW_ROOT)
    mount(".", "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    return init_argv(args.get("importtime") == "1")


def hand_over(init: str) -> None:
    """Run the root's init in this interpreter instead of starting a second one.

    The root's ``python3.11`` is the file this interpreter was copied from (the boot
    stage copies it), with the same standard library at the same paths, so what an
    ``execv`` of the root's init would rebuild is all here already: under TCG that
    start is about 1.3 s, and every later line of Python runs on code QEMU has
    translated once already. What a fresh ``python3.11 -I`` would differ in is set here:
    ``site`` (this interpreter ran with ``-S``) adds the root's site directories, the
    import system forgets the initramfs' directory listings, and the script runs as
    ``__main__`` with ``sys.argv`` naming it. The initramfs' own files are deleted; the
    interpreter and the libraries it has mapped stay in memory while PID 1 runs.
    """
    import sys

    # First: the finders cached for /usr/lib/python3.11 list the initramfs' copy of it.
    sys.path_importer_cache.clear()
    import site

    site.main()
    sys.argv[:] = [init]
    with open(init, "rb") as stream:
        code = compile(stream.read(), init, "exec")
    script = type(sys)("__main__")  # a new __main__: this file's module stays as it is
    script.__file__ = init
    sys.modules["__main__"] = script
    exec(code, script.__dict__)


def init_argv(importtime: bool, init: str = INIT) -> list[str]:
    """How to exec the root's init. ``basalt.importtime=1`` on the kernel command line runs
    its interpreter (the ``#!`` line) with ``-X importtime``: every import's cost under
    this machine's CPU is printed on the console (bench/boot --importtime reads it)."""
    if not importtime:
        return [init]
    with open(init, "rb") as stream:
        shebang = stream.readline(256)
    if not shebang.startswith(b"#!"):
        return [init]
    interpreter = shebang[2:].decode().split()
    return [*interpreter, "-X", "importtime", init]


def main() -> None:
    """Switch to the root; on failure, say why and let the kernel reboot."""
    if os.getpid() != 1 or not os.path.exists(INITRD_MARKER):
        # This mounts over /dev, /proc and /sys, deletes files and switches root: only
        # ever as the init of an initramfs, never on a host or root that runs it by mistake.
        raise SystemExit("basalt init: refusing to run: not PID 1 of a Basalt initramfs")
    try:
        argv = initrd_stage()
    except BaseException as exc:
        log(f"fatal: {type(exc).__name__}: {exc}")
        time.sleep(5)
        raise SystemExit(1) from None  # PID 1 exiting panics; panic=-1 reboots
    if argv == [INIT]:
        hand_over(INIT)
    else:  # an interpreter with other flags (basalt.importtime=1): a fresh start
        os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
