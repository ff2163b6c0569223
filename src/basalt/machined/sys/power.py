"""Reboot and power off through reboot(2), and ending every other process first.

Everything here acts on the whole machine, so every call refuses unless this process
is PID 1: a test or a developer running the agent as a plain process can never reboot
the host by mistake. In a PID namespace, reboot(2) from the namespace's PID 1 ends
that namespace only (its init is killed by SIGHUP for a reboot, SIGINT for a power-off);
tests use that.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from enum import StrEnum
from pathlib import Path
from typing import NoReturn

from basalt.machinery.errors import BasaltError

from ._libc import check, libc

__all__ = [
    "PowerAction",
    "PowerError",
    "power",
    "set_ctrl_alt_del",
    "sync",
    "terminate_all",
]

RB_AUTOBOOT = 0x01234567
RB_HALT_SYSTEM = 0xCDEF0123
RB_POWER_OFF = 0x4321FEDC
RB_ENABLE_CAD = 0x89ABCDEF
RB_DISABLE_CAD = 0
#: reboot(2) into the kernel kexec_file_load(2) loaded (sys/kexec.py).
RB_KEXEC = 0x45584543

#: /proc/PID/stat flags bit of kernel threads, which kill(-1) does not reach.
_PF_KTHREAD = 0x00200000


class PowerAction(StrEnum):
    REBOOT = "reboot"
    POWEROFF = "poweroff"
    HALT = "halt"
    KEXEC = "kexec"  #: reboot into the loaded kexec kernel, without the firmware


_COMMANDS = {
    PowerAction.REBOOT: RB_AUTOBOOT,
    PowerAction.POWEROFF: RB_POWER_OFF,
    PowerAction.HALT: RB_HALT_SYSTEM,
    PowerAction.KEXEC: RB_KEXEC,
}


class PowerError(BasaltError):
    """A power operation was refused (not PID 1) or failed."""


def _require_init(what: str) -> None:
    if os.getpid() != 1:
        raise PowerError(
            f"{what} refused: only PID 1 acts on the whole machine (this is pid {os.getpid()})"
        )


def _reboot(command: int, what: str) -> None:
    try:
        check(libc().reboot(ctypes.c_uint(command)), what)
    except OSError as exc:
        raise PowerError(f"{what} failed: {exc.strerror}") from exc


def sync() -> None:
    """Flush every filesystem's dirty data to disk (sync(2))."""
    libc().sync()


def set_ctrl_alt_del(enabled: bool) -> None:
    """With ``enabled`` False, Ctrl-Alt-Del sends SIGINT to PID 1 instead of rebooting."""
    _require_init("changing Ctrl-Alt-Del")
    _reboot(RB_ENABLE_CAD if enabled else RB_DISABLE_CAD, "changing Ctrl-Alt-Del")


def _user_processes(proc: Path = Path("/proc")) -> list[int]:
    """Every process but this one and kernel threads."""
    found = []
    own = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 6 and int(fields[6]) & _PF_KTHREAD:
            continue
        found.append(int(entry.name))
    return found


def _reap_all() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def terminate_all(grace: float = 5.0) -> list[int]:
    """SIGTERM every other process, wait up to ``grace`` seconds, SIGKILL what is left.

    Returns the pids that had to be killed. Only for PID 1, after its own event loop
    has stopped (it reaps every child with waitpid(-1)).
    """
    _require_init("ending all processes")
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while True:
        _reap_all()
        left = _user_processes()
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        end = time.monotonic() + 2.0
        while _user_processes() and time.monotonic() < end:
            _reap_all()
            time.sleep(0.05)
    return left


def power(action: PowerAction) -> NoReturn:
    """Sync, then reboot (through the firmware or kexec), power off or halt the machine.
    Never returns."""
    _require_init(str(action))
    sync()
    _reboot(_COMMANDS[action], str(action))
    raise PowerError(f"{action} returned without effect")
