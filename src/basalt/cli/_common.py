"""Shared CLI plumbing: global options, output, safe file writes."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from basalt.machinery.client.config import ClientConfig


@dataclass
class GlobalOptions:
    """Options given before the verb: ``basaltctl --debug --context X ...``."""

    debug: bool = False
    basaltconfig: Path | None = None
    context: str | None = None

    @property
    def client_config_path(self) -> Path:
        from basalt.machinery.client.config import default_client_config_path

        return self.basaltconfig or default_client_config_path()

    def load_client_config(self, *, missing_ok: bool = False) -> ClientConfig:
        from basalt.machinery.client.config import load_client_config

        return load_client_config(self.client_config_path, missing_ok=missing_ok)


def options(ctx: typer.Context) -> GlobalOptions:
    root = ctx.find_root()
    if not isinstance(root.obj, GlobalOptions):
        root.obj = GlobalOptions()
    return root.obj


def info(message: str) -> None:
    """A progress or result line on stderr (stdout stays for data)."""
    print(message, file=sys.stderr)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_text(path: Path, what: str) -> str:
    """Read a user-given file, turning OS errors into one clear BasaltError."""
    from basalt.machinery.errors import BasaltError

    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BasaltError(f"{what} {path} does not exist", hint="check the path") from None
    except IsADirectoryError:
        raise BasaltError(f"{what} {path} is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BasaltError(f"{what} {path} cannot be read: {exc}") from None


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    """Check every output before anything is written, so a refusal changes nothing."""
    from basalt.machinery.errors import OutputExistsError

    if force:
        return
    for path in paths:
        if path.exists():
            raise OutputExistsError(str(path))


def write_outputs(outputs: dict[Path, str], *, mode: int = 0o600) -> None:
    from basalt.machinery.fileio import write_atomic

    for path, text in outputs.items():
        write_atomic(path, text, mode=mode)
        info(f"wrote {path}")
