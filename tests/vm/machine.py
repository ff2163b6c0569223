"""One QEMU guest booted from a built image, for the VM tests: start, wait, read, stop.

The node's API port is forwarded to a free host loopback port; the console goes to a
file. Timings are host wall clock from just before QEMU starts.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from basalt.imager.qemu import direct_kernel_command, free_port
from basalt.provision.qemu_runner import BOOTED_MARK, die_with_runner

T = TypeVar("T")

#: A guest whose console has no line of the initramfs this long after QEMU started is
#: stuck before Basalt runs: in firmware, systemd-boot or the kernel's early boot (a boot
#: reaches the initramfs 4-9 s after QEMU starts under TCG). Seen once in about a hundred
#: boots of one disk that booted again at once; :meth:`Vm.wait` then power-cycles the
#: guest once, as a board's watchdog would (and the qemu runner does), and says so.
STALL_BEFORE_INITRAMFS = 90.0

#: Console lines stamped with the kernel's uptime by the initramfs init and by machined.
_STAMP = re.compile(rb"^\[\s*([0-9.]+)\] (basalt-init|machined): (?:INFO \S+: )?(.*)$", re.M)
#: The console lines worth printing for a boot timeline.
TIMELINE = (
    "initramfs: started",
    "initramfs: mounted",
    "PID 1: machined",
    "loaded kernel modules",
    "boot: started",
    "API listening",
    "DHCP lease",
    "boot: install: phase started",
    "boot: finished",
)


@dataclass
class Vm:
    """A running guest. ``port`` is the host port forwarded to the node's API."""

    argv: list[str]
    console: Path
    port: int
    process: subprocess.Popen[bytes]
    started: float
    marks: dict[str, float] = field(default_factory=dict)
    #: Power cycles :meth:`wait` made because the guest stalled before the initramfs.
    relaunched: int = 0
    #: The console has shown the initramfs (then it need not be read for it again).
    reached_initramfs: bool = False

    @classmethod
    def boot(
        cls,
        image: Path,
        workdir: Path,
        *,
        machine: str = "microvm",
        cpus: int = 2,
        qga: Path | None = None,
        extra_cmdline: str = "",
    ) -> Vm:
        """Boot ``image``; with ``qga``, the guest gets a virtio-serial port named
        org.qemu.guest_agent.0 whose host end is the unix socket ``qga``."""
        port = free_port()
        console = workdir / "console.log"
        argv = direct_kernel_command(
            image, port, machine=machine, cpus=cpus, extra_cmdline=extra_cmdline
        )
        if qga is not None:
            argv += qga_arguments(qga, machine)
        return cls(argv, console, port, *_launch(argv, console))

    @classmethod
    def boot_disk(
        cls,
        disk: Path,
        workdir: Path,
        *,
        port: int | None = None,
        name: str = "console",
        cpus: int = 2,
        memory_mib: int = 512,
        extra_args: tuple[str, ...] = (),
    ) -> Vm:
        """Boot ``disk`` (a qcow2 overlay of the image's disk.raw) under OVMF through
        systemd-boot. ``-no-reboot``: a guest reboot ends QEMU; boot again to go on."""
        port = port or free_port()
        console = workdir / f"{name}.log"
        argv = uefi_disk_command(disk, port, cpus=cpus, memory_mib=memory_mib)
        argv += list(extra_args)
        return cls(argv, console, port, *_launch(argv, console))

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def mark(self, name: str) -> float:
        """Record (and return) the time since QEMU started under ``name``."""
        self.marks[name] = self.elapsed()
        return self.marks[name]

    def console_text(self) -> str:
        return self.console.read_bytes().decode(errors="replace")

    def console_tail(self, chars: int = 6000) -> str:
        return self.console_text()[-chars:]

    def timeline(self) -> list[tuple[float, str]]:
        """(kernel uptime, message) of the console lines in :data:`TIMELINE`."""
        found = []
        for uptime, who, message in _STAMP.findall(self.console.read_bytes()):
            text = f"{who.decode()}: {message.decode(errors='replace')}"
            if any(key in text for key in TIMELINE):
                found.append((float(uptime), text))
        return found

    def wait(
        self, attempt: Callable[[], Awaitable[T]], timeout: float, what: str, poll: float = 0.2
    ) -> T:
        """Run ``attempt`` until it returns without raising; fail with the console's tail
        when QEMU exits or ``timeout`` passes."""

        async def loop() -> T:
            deadline = time.monotonic() + timeout
            last: BaseException | None = None
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if self._stalled_before_initramfs():
                    self._power_cycle()
                    deadline += STALL_BEFORE_INITRAMFS
                try:
                    return await attempt()
                except Exception as exc:
                    last = exc
                    await asyncio.sleep(poll)
            state = "QEMU exited" if self.process.poll() is not None else f"{timeout:.0f} s passed"
            raise AssertionError(
                f"{what}: {state}; last error: {last!r}\nconsole:\n{self.console_tail()}"
            )

        return asyncio.run(loop())

    def _stalled_before_initramfs(self) -> bool:
        if self.reached_initramfs or self.relaunched or self.elapsed() <= STALL_BEFORE_INITRAMFS:
            return False
        self.reached_initramfs = BOOTED_MARK in self.console.read_bytes()
        return not self.reached_initramfs

    def _power_cycle(self) -> None:
        """Kill QEMU and start it again on the same disk and port, the console appended."""
        self.stop()
        note = (
            f"\n[vm harness] no initramfs line {STALL_BEFORE_INITRAMFS:.0f} s after QEMU "
            "started: stuck before Basalt runs; power cycle\n"
        )
        print(note.strip(), self.console, flush=True)
        with self.console.open("ab") as log:
            log.write(note.encode())
        self.process, self.started = _launch(self.argv, self.console, append=True)
        self.relaunched += 1

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _launch(
    argv: list[str], console: Path, append: bool = False
) -> tuple[subprocess.Popen[bytes], float]:
    """Start QEMU with its output to ``console``: the process and when it started."""
    with console.open("ab" if append else "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=die_with_runner,  # noqa: PLW1509 (started from the main thread)
        )
    return process, started


def qga_arguments(socket_path: Path, machine: str = "microvm") -> list[str]:
    """QEMU arguments for a guest agent channel: a virtio-serial controller, a port named
    org.qemu.guest_agent.0, and a unix socket on the host (QEMU listens on it)."""
    bus = "device" if machine == "microvm" else "pci"
    return [
        *("-device", f"virtio-serial-{bus}"),
        *("-chardev", f"socket,id=qga0,path={socket_path},server=on,wait=off"),
        *("-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"),
    ]


OVMF = Path("/usr/share/ovmf/OVMF.fd")


def uefi_disk_command(
    disk: Path,
    port: int,
    *,
    cpus: int = 2,
    memory_mib: int = 512,
    address: str = "127.0.0.1",
    netdev_options: tuple[str, ...] = (),
) -> list[str]:
    """q35 + OVMF booting ``disk`` (qcow2) from virtio-blk; the API port forwarded from
    ``address``; ``netdev_options`` go on the user network's ``-netdev`` (``restrict=on``,
    a ``guestfwd=...``)."""
    from basalt.imager.qemu import GUEST_API_PORT
    from basalt.provision.qemu import TCG_CPU

    netdev = ",".join(["user", "id=n0", f"hostfwd=tcp:{address}:{port}-:{GUEST_API_PORT}",
                       *netdev_options])  # fmt: skip
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mib), "-smp", str(cpus),
        "-nographic", "-no-reboot", "-M", "q35", "-cpu", TCG_CPU, "-bios", str(OVMF),
        "-vga", "none",
        "-drive", f"file={disk},format=qcow2,if=none,id=d0",
        "-device", "virtio-blk-pci,drive=d0,bootindex=0",
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip


async def call(
    endpoint: str, method: str, request: Any, *, context: Any = None, timeout: float = 10.0
) -> Any:
    """One unary MachineService call: insecure (maintenance) without ``context``, else mTLS
    with the client config context's CA and certificate."""
    from basalt.machinery.client.client import Client

    if context is None:
        client = await Client.connect(endpoint, insecure=True)
    else:
        client = await Client.connect(endpoint, ca=context.ca, crt=context.crt, key=context.key)
    try:
        return await getattr(client.machine, method)(request, timeout=timeout)
    finally:
        await client.close()
