"""``basaltctl validate``: check a machine config for a mode, reporting every error."""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ._common import info, read_text


class ModeChoice(StrEnum):
    metal = "metal"
    container = "container"


def validate(
    config: Annotated[
        Path, typer.Option("-c", "--config", help="Machine config file (- for stdin).")
    ],
    mode: Annotated[ModeChoice, typer.Option("-m", "--mode", help="Where the config will run.")],
    strict: Annotated[bool, typer.Option("--strict", help="Treat warnings as errors.")] = False,
) -> None:
    """Validate a machine config; exit 1 listing every error with its document and field path."""
    from basalt.machinery.config import Mode, check_bundle, load_bundle
    from basalt.machinery.errors import ConfigValidationError

    source = str(config)
    bundle = load_bundle(read_text(config, "config"), source)
    warnings = check_bundle(bundle, Mode(mode.value))
    if strict and warnings:
        raise ConfigValidationError([replace(w, severity="error") for w in warnings], source=source)
    for problem in warnings:
        info(problem.render())
    info(f"{source}: valid for {mode.value} mode")
