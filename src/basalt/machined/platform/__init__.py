"""Platform mode and capabilities: what kind of machine the agent runs on.

Code asks capabilities (``mode.requires_install``), never ``if platform == "qemu"``.
"""

from __future__ import annotations

import os
import platform as _platform
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from basalt.machinery.launch import EXIT_REBOOT, EXIT_SHUTDOWN


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


@dataclass
class Platform:
    """The machine the agent runs on; container mode is the only one implemented here."""

    mode: PlatformMode
    paths: NodePaths
    address: str
    hostname: str
    arch: str = field(default_factory=_platform.machine)

    def exit_code(self, action: str) -> int:
        """What the process exits with to make its launcher reboot or stop it."""
        return EXIT_REBOOT if action == "reboot" else EXIT_SHUTDOWN
