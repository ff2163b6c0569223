"""Platform mode and capabilities: what kind of machine the agent runs on.

Code asks capabilities (``mode.requires_install``), never ``if platform == "qemu"``.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from basalt.machinery.launch import EXIT_REBOOT, EXIT_SHUTDOWN

if TYPE_CHECKING:
    from ..extensions import MountedExtension
    from ..sys.clock import Clock


class PlatformMode(StrEnum):
    """``metal``: PID 1 on a real or virtual machine. ``container``: a process on a host."""

    METAL = "metal"
    CONTAINER = "container"

    @property
    def requires_install(self) -> bool:
        return self is PlatformMode.METAL

    @property
    def in_container(self) -> bool:
        return self is PlatformMode.CONTAINER

    @property
    def reads_kernel_log(self) -> bool:
        return self is PlatformMode.METAL

    @property
    def manages_network(self) -> bool:
        """Links, addresses, routes, DHCP, resolvers and /etc/hosts are the agent's job."""
        return self is PlatformMode.METAL

    @property
    def manages_kernel(self) -> bool:
        """Sysctls, kernel modules and the host name are the agent's job."""
        return self is PlatformMode.METAL


@dataclass(frozen=True)
class NodePaths:
    """Where the node keeps things. ``root`` is the node's filesystem view for the API."""

    root: Path
    state: Path
    ephemeral: Path

    @classmethod
    def under(cls, root: Path) -> NodePaths:
        return cls(root=root, state=root / "system" / "state", ephemeral=root / "var")

    def create(self) -> None:
        for path in (self.state, self.ephemeral, self.ephemeral / "log", self.ephemeral / "lib"):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)


def stored_uuid(path: Path) -> str:
    """The UUID in ``path``, made (random) and kept there when it has none."""
    import uuid

    try:
        return str(uuid.UUID(path.read_text().strip()))
    except (OSError, ValueError):
        pass
    made = str(uuid.uuid4())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(made + "\n")
    os.replace(tmp, path)
    return made


#: The address a node has before its network tells it one: listen on every address.
UNSPECIFIED_ADDRESS = "0.0.0.0"

#: How the agent ends: the launcher (or, as PID 1, the kernel) restarts or stops the machine.
PowerAction = Literal["reboot", "shutdown"]


@dataclass
class Platform:
    """The machine the agent runs on. This base is container mode; ``metal`` subclasses it
    (:class:`basalt.machined.platform.metal.MetalPlatform`)."""

    mode: PlatformMode
    paths: NodePaths
    address: str
    hostname: str
    arch: str = field(default_factory=lambda: os.uname().machine)
    #: Where the machine's kernel interfaces are: ``proc/sys``, ``lib/modules``, ``run``.
    system_root: Path = Path("/")
    #: The system extensions mounted at boot (metal; their services run as ``ext-*``).
    extensions: list[MountedExtension] = field(default_factory=list)

    @property
    def generated_etc(self) -> Path:
        """Where the agent writes the /etc files it generates (hostname, hosts, resolv.conf)."""
        return self.system_root / "run" / "basalt" / "etc"

    @property
    def address_known(self) -> bool:
        return self.address != UNSPECIFIED_ADDRESS

    @property
    def fleet_dir(self) -> Path:
        """Where the link to a fleet keeps its identity. Container mode: beside the node's
        disks, so a reset (which wipes STATE) keeps the machine enrolled, as the
        firmware's UUID stays with a real machine."""
        return self.paths.root / "fleet"

    def machine_uuid(self) -> str:
        """The machine's UUID: container mode makes one on first use and keeps it beside
        the node's disks (as firmware keeps a machine's)."""
        return stored_uuid(self.paths.root / "machine-uuid")

    def kernel_arg(self, name: str) -> str:
        """A ``name=value`` kernel argument of this machine ('' in container mode, whose
        kernel is the host's)."""
        return ""

    def prepare(self) -> None:
        """Make the machine ready for the agent (mounts, /etc files); blocking, idempotent."""

    def begin(self) -> None:
        """Hook run before the event loop exists and before most of the agent's imports:
        work for another CPU meanwhile (metal as PID 1: a child loads kernel modules)."""

    def start(self) -> None:
        """Hook run on the event loop before boot (metal as PID 1: the zombie reaper)."""

    def power_signals(self) -> dict[signal.Signals, PowerAction]:
        """Signal -> the sequence it starts: a process stops on either."""
        return {signal.SIGTERM: "shutdown", signal.SIGINT: "shutdown"}

    def clock(self) -> Clock:
        """The clock time sync corrects: here one it only reads (a container does not own
        the machine's clock)."""
        from ..sys.clock import ObservingClock

        return ObservingClock()

    def exit_code(self, action: PowerAction) -> int:
        """What the process exits with to make its launcher reboot or stop it."""
        return EXIT_REBOOT if action == "reboot" else EXIT_SHUTDOWN
