"""kexec: load the next kernel into this one, then reboot into it without the firmware.

``kexec_file_load(2)`` takes the kernel and initrd as open files and the command line as
text; the kernel checks the image (and, under lockdown, its signature) and keeps it until
``reboot(LINUX_REBOOT_CMD_KEXEC)`` jumps to it or it is unloaded. Nothing on disk changes.
The kernel refuses when ``kernel.kexec_load_disabled`` is 1 (a sysctl that cannot be
turned back to 0 until the next boot): that is how an operator turns kexec off for a node
(``SysctlConfig``), and the node then reboots through its firmware.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from basalt.machinery.errors import BasaltError

from ._libc import libc

__all__ = ["KexecError", "load", "loaded", "unload"]

#: kexec_file_load's syscall number per machine (asm/unistd_64.h, asm-generic/unistd.h).
_SYSCALL = {"x86_64": 320, "aarch64": 294, "riscv64": 294}
KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_NO_INITRAMFS = 0x4
LOADED = Path("/sys/kernel/kexec_loaded")

#: Why the kernel refused, by errno, in words an operator can act on.
_REASONS = {
    errno.EPERM: "the kernel refuses kexec (kernel.kexec_load_disabled is 1, or lockdown)",
    errno.ENOSYS: "this kernel has no kexec_file_load",
    errno.ENOEXEC: "the kernel image is not one this kernel can load",
    errno.EKEYREJECTED: "the kernel image's signature was rejected",
    errno.EBUSY: "a kexec image is being loaded already",
    errno.ENOMEM: "no memory for the new kernel",
}


class KexecError(BasaltError):
    """The kernel would not load the next kernel for kexec."""


def _syscall_number() -> int:
    machine = os.uname().machine
    number = _SYSCALL.get(machine)
    if number is None:
        raise KexecError(f"kexec_file_load is not known on {machine}")
    return number


def _call(kernel_fd: int, initrd_fd: int, cmdline: bytes, flags: int) -> None:
    number = _syscall_number()
    syscall = libc().syscall
    syscall.restype = ctypes.c_long
    result = syscall(
        ctypes.c_long(number),
        ctypes.c_int(kernel_fd),
        ctypes.c_int(initrd_fd),
        ctypes.c_ulong(len(cmdline)),
        ctypes.c_char_p(cmdline) if cmdline else None,
        ctypes.c_ulong(flags),
    )
    if result < 0:
        err = ctypes.get_errno()
        raise KexecError(
            f"kexec_file_load: {_REASONS.get(err, os.strerror(err))} ({errno.errorcode.get(err)})"
        )


def load(kernel: Path, initrd: Path | None, cmdline: str) -> None:
    """Load ``kernel`` (and ``initrd``) with ``cmdline`` for the next kexec reboot."""
    text = cmdline.encode("ascii") + b"\0"
    fds = []
    try:
        try:
            fds.append(os.open(kernel, os.O_RDONLY | os.O_CLOEXEC))
            if initrd is not None:
                fds.append(os.open(initrd, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            raise KexecError(f"{exc.filename}: cannot be read: {exc.strerror}") from None
        if initrd is None:
            _call(fds[0], -1, text, KEXEC_FILE_NO_INITRAMFS)
        else:
            _call(fds[0], fds[1], text, 0)
    finally:
        for fd in fds:
            os.close(fd)


def unload() -> None:
    """Drop a loaded kexec image (nothing when none is loaded)."""
    _call(-1, -1, b"", KEXEC_FILE_UNLOAD)


def loaded(path: Path = LOADED) -> bool:
    """Whether a kexec image is loaded: the next reboot(LINUX_REBOOT_CMD_KEXEC) boots it."""
    try:
        return path.read_text().strip() == "1"
    except OSError:
        return False
