"""Basalt's first process: the stepping stone until machined's ``metal`` platform lands.

This file runs in the guest, as PID 1, in two places (see docs/adr/0006-initramfs.md):

``initrd``
    Copied as ``/init`` into the initramfs, behind ``#!/usr/bin/python3.11 -IS``. It
    mounts ``/proc``, ``/sys`` and ``devtmpfs``, loads the kernel modules listed in
    ``/etc/basalt/modules.load`` (virtio transport and block, squashfs) with
    ``finit_module``, mounts the squashfs root read-only from ``basalt.root=`` (default
    ``/dev/vda``), frees the initramfs, moves the API filesystems over, switches root
    (``MS_MOVE`` + ``chroot``) and execs ``/sbin/init``.
``root``
    ``/sbin/init`` of the squashfs root calls :func:`main`. It mounts tmpfs on ``/run``,
    ``/tmp`` and ``/var`` (the root stays read-only), loads the modules listed in
    ``/usr/lib/basalt/modules.load`` (virtio-net, virtio-rng), brings up ``lo`` and the
    uplink with a static address and default route through ioctls, and execs
    ``machined --platform container`` with its node directory on ``/var``.

Only the standard library is used, and in the ``initrd`` stage only what the initramfs
holds (``os``, ``sys``, ``time``, ``ctypes``). Kernel arguments: ``basalt.root=``,
``basalt.address=ADDR/PREFIX``, ``basalt.gateway=``, ``basalt.interface=``,
``basalt.hostname=``. What this shim does not do and the metal platform will: reap
zombies, handle power signals, keep running when machined exits (today PID 1 exiting
panics the kernel, which then reboots or, under ``-no-reboot``, stops QEMU), DHCP,
persistent STATE/EPHEMERAL partitions.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

INITRD_MARKER = "/etc/initrd-release"
INITRD_MODULES = "/etc/basalt/modules.load"
ROOT_MODULES = "/usr/lib/basalt/modules.load"
NEW_ROOT = "/sysroot"
DEFAULTS = {
    "root": "/dev/vda",
    "address": "10.0.2.15/24",
    "gateway": "10.0.2.2",
    "interface": "eth0",
    "hostname": "basalt",
}

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_MOVE = 0x1, 0x2, 0x4, 0x8, 0x2000
_SYS_FINIT_MODULE = 313  # x86_64
_EEXIST, _EBUSY = 17, 16

_libc = ctypes.CDLL(None, use_errno=True)


def log(message: str) -> None:
    """One line on the console, stamped with the kernel's uptime."""
    try:
        with open("/proc/uptime") as stream:
            uptime = stream.read().split()[0]
    except OSError:
        uptime = "?"
    print(f"[{uptime:>8}] basalt-init: {message}", flush=True)


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


def wait_for(path: str, timeout: float, content: str | None = None) -> None:
    """Until ``path`` exists (and, given ``content``, holds it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as stream:
                if content is None or stream.read().strip() == content:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not ready within {timeout:.0f} s")
        time.sleep(0.01)


def _free_initramfs(path: str, device: int) -> None:
    """Delete the initramfs' files (they hold RAM), staying on its own filesystem."""
    for entry in os.scandir(path):
        full = entry.path
        if full == NEW_ROOT or entry.stat(follow_symlinks=False).st_dev != device:
            continue
        if entry.is_dir(follow_symlinks=False):
            _free_initramfs(full, device)
            os.rmdir(full)
        else:
            os.unlink(full)


def initrd_stage() -> None:
    """Find the root, mount it read-only, switch to it, exec its ``/sbin/init``."""
    mount_api_filesystems()
    log("initramfs: started")
    log(f"initramfs: loaded {load_modules(INITRD_MODULES)} modules")
    args = kernel_args()
    wait_for(args["root"], 10)
    mount(args["root"], NEW_ROOT, "squashfs", MS_RDONLY | MS_NODEV)
    log(f"initramfs: mounted {args['root']} read-only; switching root")
    for api in ("/dev", "/proc", "/sys"):
        mount(api, NEW_ROOT + api, None, MS_MOVE)
    _free_initramfs("/", os.lstat("/").st_dev)
    os.chdir(NEW_ROOT)
    mount(".", "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    os.execv("/sbin/init", ["/sbin/init"])


def _ifreq(name: str, payload: bytes) -> bytes:
    return name.encode().ljust(16, b"\0") + payload.ljust(24, b"\0")


def _sockaddr_in(address: str) -> bytes:
    import socket
    import struct

    return struct.pack("=H2s4s8x", socket.AF_INET, b"", socket.inet_aton(address))


def configure_interface(name: str, address: str, prefix: int) -> None:
    """Address, netmask and IFF_UP on ``name`` through the classic SIOCSIF* ioctls."""
    import fcntl
    import socket
    import struct

    siocsifaddr, siocsifnetmask, siocgifflags, siocsifflags = 0x8916, 0x891C, 0x8913, 0x8914
    mask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, siocsifaddr, _ifreq(name, _sockaddr_in(address)))
        fcntl.ioctl(sock, siocsifnetmask, _ifreq(name, _sockaddr_in(mask)))
        flags = struct.unpack_from("h", fcntl.ioctl(sock, siocgifflags, _ifreq(name, b"")), 16)[0]
        fcntl.ioctl(sock, siocsifflags, _ifreq(name, struct.pack("h", flags | 0x1)))


def add_default_route(gateway: str) -> None:
    """SIOCADDRT: 0.0.0.0/0 via ``gateway``."""
    import fcntl
    import socket

    sockaddr = ctypes.c_ubyte * 16

    class RtEntry(ctypes.Structure):  # struct rtentry from <linux/route.h>
        _fields_ = [
            ("pad1", ctypes.c_ulong),
            ("dst", sockaddr),
            ("gateway", sockaddr),
            ("genmask", sockaddr),
            ("flags", ctypes.c_ushort),
            ("pad2", ctypes.c_short),
            ("pad3", ctypes.c_ulong),
            ("pad4", ctypes.c_void_p),
            ("metric", ctypes.c_short),
            ("dev", ctypes.c_char_p),
            ("mtu", ctypes.c_ulong),
            ("window", ctypes.c_ulong),
            ("irtt", ctypes.c_ushort),
        ]

    route = RtEntry()
    route.dst = sockaddr.from_buffer_copy(_sockaddr_in("0.0.0.0"))
    route.genmask = sockaddr.from_buffer_copy(_sockaddr_in("0.0.0.0"))
    route.gateway = sockaddr.from_buffer_copy(_sockaddr_in(gateway))
    route.flags = 0x1 | 0x2  # RTF_UP | RTF_GATEWAY
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, 0x890B, bytes(route))


def root_stage() -> None:
    """Writable tmpfs where the node needs it, network, then exec machined."""
    import socket

    mount_api_filesystems()
    log("root: started")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", "/var", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    log(f"root: loaded {load_modules(ROOT_MODULES)} modules")
    args = kernel_args()
    address, _, prefix = args["address"].partition("/")
    configure_interface("lo", "127.0.0.1", 8)
    wait_for(f"/sys/class/net/{args['interface']}/ifindex", 10)
    configure_interface(args["interface"], address, int(prefix or 24))
    # The gateway must be reachable through a link with carrier, or SIOCADDRT says EINVAL.
    wait_for(f"/sys/class/net/{args['interface']}/carrier", 10, "1")
    add_default_route(args["gateway"])
    socket.sethostname(args["hostname"])
    log(f"root: {args['interface']} {address}/{prefix or 24} via {args['gateway']}; exec machined")
    argv = [sys.executable, "-m", "basalt.machined", "--platform", "container"]
    argv += ["--node-dir", "/var/basalt", "--address", address, "--hostname", args["hostname"]]
    env = {"PATH": "/usr/bin", "HOME": "/var", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    os.execve(sys.executable, argv, env)


def main() -> None:
    """Run the stage this file is in; on failure, say why and let the kernel reboot."""
    if os.getpid() != 1:
        # This mounts over /run, /tmp and /var and reconfigures the network: only ever as
        # the init of a VM, never on a host that runs it by mistake.
        raise SystemExit("basalt init: refusing to run: not PID 1")
    stage = initrd_stage if os.path.exists(INITRD_MARKER) else root_stage
    try:
        stage()
    except BaseException as exc:
        log(f"fatal: {type(exc).__name__}: {exc}")
        try:
            import traceback

            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
        except ImportError:  # the initramfs holds no traceback module
            pass
        time.sleep(5)
        raise SystemExit(1) from None  # PID 1 exiting panics; panic=-1 reboots


if __name__ == "__main__":
    main()
