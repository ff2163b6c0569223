"""Plays the power button for one QEMU node: starts QEMU again when its guest reboots.

A node boots from its disk under OVMF with ``-no-reboot`` (reboots inside one QEMU
process are slow and erratic under TCG; BOOT-NOTES), so a guest reboot ends QEMU. This
runner starts QEMU, and when it exits 0 after the guest kernel printed ``reboot:
Restarting system`` it starts the same command again; a power-off, a crash or a signal
ends it. SIGTERM is passed to QEMU (which powers the VM off) and then ends the runner.

    python -m basalt.provision.qemu_runner --console FILE -- qemu-system-x86_64 ...
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

#: What the guest kernel prints just before it resets the machine.
REBOOT_MARK = b"reboot: Restarting system"


def rebooted(console: Path, offset: int) -> bool:
    """Whether the console, after ``offset``, shows the guest asking for a reset."""
    try:
        with console.open("rb") as stream:
            stream.seek(offset)
            return REBOOT_MARK in stream.read()
    except OSError:
        return False


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


def run(qemu: list[str], console: Path, power: Power | None = None) -> int:
    """QEMU's exit code once it ends without a guest reboot (or ``power`` is stopped)."""
    power = power or Power()
    boots = 0
    code = 0
    while not power.stopping:
        boots += 1
        offset = _size(console)
        with console.open("ab") as log:
            child = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        power.child = child
        while True:
            try:
                code = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                continue
        if power.stopping or code != 0 or not rebooted(console, offset):
            break
        _note(console, f"the guest rebooted; starting QEMU again (boot {boots + 1})")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="basalt-qemu-runner")
    parser.add_argument("--console", type=Path, required=True)
    parser.add_argument("qemu", nargs=argparse.REMAINDER, help="the QEMU command (after --)")
    args = parser.parse_args(argv)
    qemu = args.qemu[1:] if args.qemu[:1] == ["--"] else args.qemu
    if not qemu:
        parser.error("give the QEMU command after --")
    power = Power()
    signal.signal(signal.SIGTERM, power.stop)
    signal.signal(signal.SIGINT, power.stop)
    return run(qemu, args.console, power)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
