"""Plays the power button for one QEMU node: starts QEMU again when its guest reboots.

A node boots from its disk under OVMF with ``-no-reboot`` (reboots inside one QEMU
process are slow and erratic under TCG; BOOT-NOTES), so a guest reboot ends QEMU. This
runner starts QEMU, and when it exits 0 after the guest kernel printed ``reboot:
Restarting system`` it starts the same command again; a power-off, a crash or a signal
ends it. SIGTERM is passed to QEMU (which powers the VM off) and then ends the runner.

It is the board's watchdog too. Under TCG a guest has been seen, about once in a hundred
boots, to stop before Basalt's initramfs printed anything (in the firmware, systemd-boot or
the kernel's early boot), and the same disk then booted at once. So a guest with no
initramfs line :data:`STALL_SECONDS` after QEMU started is killed and started again (a
power cycle: what a boot does with the disk's boot counters is unchanged); after
:data:`MAX_STALLS` such cycles in a row the runner gives up and exits 1.

QEMU dies with its runner (``PR_SET_PDEATHSIG``), even when the runner is killed outright.
A runner started for a test is given ``--parent PID`` (the provisioner passes
``$BASALT_QEMU_RUNNER_PARENT``): when that process is gone, the runner powers QEMU off and
ends, so a killed test run leaves no VM power-cycling behind it. A cluster made by
``basaltctl cluster create`` has no such parent: its runners outlive the command.

    python -m basalt.provision.qemu_runner --console FILE [--parent PID] -- qemu-system-x86_64 ...
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

#: What the guest kernel prints just before it resets the machine.
REBOOT_MARK = b"reboot: Restarting system"
#: What Basalt's initramfs prints first: from there on, Basalt runs the boot.
BOOTED_MARK = b"basalt-init: "
#: No initramfs line this long after QEMU started: the guest is stuck before Basalt runs.
#: A TCG boot gets there in 4-9 s alone, and in well under a minute on a busy host.
STALL_SECONDS = 120.0
#: Stalled boots in a row after which the runner stops trying.
MAX_STALLS = 3
#: The environment variable whose PID the provisioner hands to its runners as ``--parent``.
PARENT_ENV = "BASALT_QEMU_RUNNER_PARENT"
_PR_SET_PDEATHSIG = 1


#: Resolved before any fork: the child between fork and exec only calls it.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_runner() -> None:
    """In a child before exec: SIGTERM it (QEMU powers off) when the process that started
    it dies, whatever killed that process."""
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class Parent:
    """A process the runner lives no longer than (a pidfd: immune to PID reuse)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._fd = None

    def gone(self) -> bool:
        if self._fd is None:
            return True
        import select

        readable, _, _ = select.select([self._fd], [], [], 0)
        return bool(readable)


def printed(console: Path, offset: int, mark: bytes) -> bool:
    """Whether the console, after ``offset``, holds ``mark``."""
    try:
        with console.open("rb") as stream:
            stream.seek(offset)
            return mark in stream.read()
    except OSError:
        return False


def rebooted(console: Path, offset: int) -> bool:
    """Whether the console, after ``offset``, shows the guest asking for a reset."""
    return printed(console, offset, REBOOT_MARK)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _note(console: Path, message: str) -> None:
    with console.open("ab") as stream:
        stream.write(f"\n{time.strftime('%H:%M:%S')} qemu-runner: {message}\n".encode())


class Power:
    """The runner's state: the QEMU running now, and whether it was told to stop."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def stop(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def run(
    qemu: list[str],
    console: Path,
    power: Power | None = None,
    stall: float = STALL_SECONDS,
    parent: Parent | None = None,
) -> int:
    """QEMU's exit code once it ends without a guest reboot (or ``power`` is stopped);
    1 when :data:`MAX_STALLS` boots in a row stalled before the initramfs. When ``parent``
    ends, QEMU is powered off as by SIGTERM."""
    power = power or Power()
    boots = stalls = code = 0
    while not power.stopping:
        boots += 1
        offset = _size(console)
        with console.open("ab") as log:
            started = time.monotonic()
            child = subprocess.Popen(
                qemu,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_runner,  # noqa: PLW1509 (the runner has no threads)
            )
        power.child = child
        booted = stalled = False
        while True:
            try:
                code = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if parent is not None and parent.gone() and not power.stopping:
                _note(console, f"process {parent.pid} that owns this VM has ended; powering off")
                power.stop()
            if not booted:
                booted = printed(console, offset, BOOTED_MARK)
            if not booted and time.monotonic() - started > stall and not power.stopping:
                stalled = True
                child.kill()
        if power.stopping:
            break
        if stalled:
            stalls += 1
            what = f"no initramfs line {stall:.0f} s after QEMU started: stuck before Basalt ran"
            if stalls >= MAX_STALLS:
                _note(console, f"{what}, {stalls} boots in a row; giving up")
                return 1
            _note(console, f"{what}; power cycle (boot {boots + 1})")
            continue
        stalls = 0
        if code != 0 or not rebooted(console, offset):
            break
        _note(console, f"the guest rebooted; starting QEMU again (boot {boots + 1})")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="basalt-qemu-runner")
    parser.add_argument("--console", type=Path, required=True)
    parser.add_argument("--parent", type=int, help="end (and power QEMU off) when PID ends")
    parser.add_argument("qemu", nargs=argparse.REMAINDER, help="the QEMU command (after --)")
    args = parser.parse_args(argv)
    qemu = args.qemu[1:] if args.qemu[:1] == ["--"] else args.qemu
    if not qemu:
        parser.error("give the QEMU command after --")
    power = Power()
    signal.signal(signal.SIGTERM, power.stop)
    signal.signal(signal.SIGINT, power.stop)
    parent = Parent(args.parent) if args.parent else None
    return run(qemu, args.console, power, parent=parent)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
