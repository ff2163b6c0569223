"""QEMU command lines for booting a built image directly (kernel + initramfs + root).

Under TCG (``/dev/kvm`` exists on these hosts but hangs): ``-cpu max`` gives RDRAND and a
virtio-rng device feeds the entropy pool, so Python does not block at start. The node's
API port 50000 is forwarded to a host loopback port; nothing else is reachable.
"""

from __future__ import annotations

import socket
from pathlib import Path

from .pipeline import CMDLINE

GUEST_API_PORT = 50000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def direct_kernel_command(
    image: Path,
    host_port: int,
    *,
    machine: str = "microvm",
    memory_mib: int = 512,
    cpus: int = 1,
    extra_cmdline: str = "",
) -> list[str]:
    """``qemu-system-x86_64`` booting ``image`` (a ``build`` output directory).

    ``machine`` is ``microvm`` (virtio-mmio, fastest) or ``q35`` (virtio-pci).
    """
    mmio = machine == "microvm"
    bus = "device" if mmio else "pci"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mib), "-smp", str(cpus)]
    argv += ["-nographic", "-no-reboot", "-cpu", "max"]
    argv += ["-M", "microvm,x-option-roms=off,rtc=on,isa-serial=on" if mmio else "q35"]
    argv += ["-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img")]
    argv += ["-append", f"{CMDLINE} {extra_cmdline}".strip()]
    argv += ["-drive", f"id=d0,file={image / 'root.sqfs'},format=raw,if=none,readonly=on"]
    argv += ["-device", f"virtio-blk-{bus},drive=d0"]
    forward = f"hostfwd=tcp:127.0.0.1:{host_port}-:{GUEST_API_PORT}"
    argv += ["-netdev", f"user,id=n0,{forward}", "-device", f"virtio-net-{bus},netdev=n0"]
    if not mmio:
        argv[-1] += ",romfile="
    argv += ["-device", f"virtio-rng-{bus}"]
    return argv
