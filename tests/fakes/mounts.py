"""A mount table in memory for code that mounts through a ``Mounter``
(:class:`basalt.machined.extensions.Mounter`): it records each mount, answers
``is_mounted`` from what it recorded, and fails mounts on targets it is told to."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    source: str
    target: Path
    fstype: str
    flags: int
    data: str


@dataclass
class FakeMountTable:
    mounts: list[Mount] = field(default_factory=list)
    #: Targets whose mount fails, with the errno the kernel would give.
    failing: dict[Path, int] = field(default_factory=dict)

    def mount(self, source: str, target: Path, fstype: str, flags: int, data: str) -> None:
        if target in self.failing:
            code = self.failing[target]
            raise OSError(code, os.strerror(code), str(target))
        if not target.is_dir():
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(target))
        if self.is_mounted(target):  # Linux would stack it; the callers never want that
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(target))
        self.mounts.append(Mount(source, target, fstype, flags, data))

    def is_mounted(self, target: Path) -> bool:
        return any(m.target == target for m in self.mounts)
