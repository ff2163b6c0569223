"""The config store on the STATE partition (a directory in container mode).

``config.yaml`` is the committed config: the one the node boots with. A staged config
(``--mode staged``) waits in ``config.staged.yaml`` and becomes committed at the next
boot. A config under trial (``--mode try``) is never committed until confirmed, so a
crash or reboot during the trial boots the committed config: safe by construction.
Every write is atomic (temp + fsync + rename + fsync of the directory).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from basalt.machinery.fileio import write_atomic

COMMITTED = "config.yaml"
STAGED = "config.staged.yaml"


class ConfigStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir

    def _read(self, name: str) -> str | None:
        try:
            return (self.dir / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def committed(self) -> str | None:
        return self._read(COMMITTED)

    def staged(self) -> str | None:
        return self._read(STAGED)

    def commit(self, text: str) -> None:
        write_atomic(self.dir / COMMITTED, text, mode=0o600)

    def stage(self, text: str) -> None:
        write_atomic(self.dir / STAGED, text, mode=0o600)

    def drop_staged(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / STAGED).unlink()

    def promote_staged(self) -> bool:
        """At boot: make a staged config the committed one. True when there was one."""
        staged = self.staged()
        if staged is None:
            return False
        self.commit(staged)
        self.drop_staged()
        return True

    def wipe(self) -> None:
        """Remove everything on STATE (reset)."""
        import shutil  # a reset's: not the start-up's (it brings the compression modules)

        if self.dir.exists():
            for child in self.dir.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
