"""The command lines of a qemu node: QEMU itself (q35, OVMF, the node's qcow2 disk, its
network from :mod:`.qemu_network`) and the runner that plays its power button."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import bridge
from .common import ProvisionError
from .qemu_network import BRIDGE_GATEWAY, GUEST_NETWORK, Forward, mac_address, netdev, qemu_value
from .qemu_runner import PARENT_ENV
from .state import NodeRecord

QEMU = "qemu-system-x86_64"
#: Kernel arguments of a direct-kernel boot when the image does not say (image.json).
DEFAULT_CMDLINE = (
    "console=ttyS0 quiet panic=-1 cryptomgr.notests tsc_early_khz=2000000 no_timer_check"
)
IMAGE_FILES = ("vmlinuz", "initrd.img", "root.sqfs", "disk.raw")
OVMF = Path("/usr/share/ovmf/OVMF.fd")
#: The node's disk in its directory, and the module that restarts QEMU on guest reboots.
DISK_NAME = "disk.qcow2"
RUNNER = "basalt.provision.qemu_runner"


@dataclass(frozen=True)
class VmOptions:
    """What every VM of the cluster gets."""

    memory_mib: int = 512
    cpus: int = 2
    image_dir: Path | None = None
    accel: str = "auto"
    qemu: str = QEMU
    #: The node's own disk (sparse): ``install.disk``, for when install-to-disk exists.
    disk_gib: int = 8
    #: QEMU start to the maintenance API answering (TCG boots take 15-40 s).
    boot_timeout: float = 240.0
    #: user: QEMU user networking (rootless); bridge: one segment in a namespace of the
    #: cluster's own (root); auto: bridge when root mode works here, else user.
    network: str = "auto"
    #: user network only: guest-only addresses forwarded to servers on host loopback
    #: (an HTTP server with upgrade bundles, say); every node gets them.
    guest_forwards: tuple[Forward, ...] = ()


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    root: Path
    cmdline: str
    #: The UEFI disk image (GPT: EFI, BASALT-A, BASALT-B, META) each node's disk is over.
    disk: Path

    @classmethod
    def from_dir(cls, directory: Path) -> Image:
        missing = [name for name in IMAGE_FILES if not (directory / name).is_file()]
        if missing:
            raise ProvisionError(
                f"{directory} is not a built image: {', '.join(missing)} missing",
                hint="build one with 'python -m basalt.imager build --out DIR'",
            )
        cmdline = DEFAULT_CMDLINE
        with contextlib.suppress(OSError, ValueError, AttributeError):
            cmdline = json.loads((directory / "image.json").read_text()).get("cmdline") or cmdline
        return cls(
            directory / "vmlinuz",
            directory / "initrd.img",
            directory / "root.sqfs",
            cmdline,
            directory / "disk.raw",
        )


def qemu_command(
    node: NodeRecord,
    nodes: Sequence[NodeRecord],
    image: Image,
    options: VmOptions,
    accel: str,
    state_dir: Path,
    network: str = "user",
) -> list[str]:
    """The whole QEMU command line of one node (q35 + OVMF, its disk through systemd-boot).

    bridge: QEMU runs inside the cluster's namespace (``ip netns exec`` execs it, so the
    pid is QEMU's), where its tap is."""
    index = [n.name for n in nodes].index(node.name)
    node_dir = Path(node.node_dir)
    prefix = (
        bridge.BridgeNetwork.for_cluster(state_dir, GUEST_NETWORK, BRIDGE_GATEWAY).exec_prefix()
        if network == "bridge"
        else []
    )
    argv = [*prefix, options.qemu, "-name", qemu_value(node.name), "-accel", accel]
    argv += ["-m", str(options.memory_mib), "-smp", str(options.cpus), "-cpu", cpu_model(accel)]
    argv += ["-nographic", "-no-reboot", "-pidfile", str(node_dir / "qemu.pid")]
    argv += ["-M", "q35", "-bios", str(OVMF), "-vga", "none"]
    disk = qemu_value(str(node_dir / DISK_NAME))
    argv += ["-drive", f"id=disk,file={disk},format=qcow2,if=none,discard=unmap"]
    argv += ["-device", "virtio-blk-pci,drive=disk,bootindex=0"]
    argv += ["-netdev", netdev(node, nodes, state_dir, network, options.guest_forwards)]
    argv += ["-device", f"virtio-net-pci,netdev=n0,mac={mac_address(index)},romfile="]
    argv += ["-device", "virtio-rng-pci"]
    return argv


#: The guest CPU under TCG: everything QEMU emulates but AVX2. QEMU 7.2 emulates AVX2
#: slowly enough that OpenSSL's AVX2 sha256 takes twice as long as its AVX path (qemu-user,
#: 16 MiB: 655 ms with AVX2, 345 ms without); hashing an upgrade bundle and TLS are most
#: of what an upgrade costs the guest. Debian's binaries need no AVX2.
TCG_CPU = "max,-avx2"


def cpu_model(accel: str) -> str:
    """``-cpu`` for ``accel``: the host's CPU under KVM, :data:`TCG_CPU` under TCG."""
    return "max" if accel == "kvm" else TCG_CPU


def runner_command(argv: list[str], node: NodeRecord, python: str = sys.executable) -> list[str]:
    """QEMU under :mod:`basalt.provision.qemu_runner`: started again on a guest reboot."""
    console = str(Path(node.node_dir) / "console.log")
    parent = os.environ.get(PARENT_ENV, "")
    owner = ["--parent", parent] if parent.isdigit() else []
    return [python, "-m", RUNNER, "--console", console, *owner, "--", *argv]
