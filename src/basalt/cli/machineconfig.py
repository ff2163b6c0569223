"""``basaltctl machineconfig``: offline operations on machine config files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ._common import read_text, refuse_overwrite, warn, write_outputs

app = typer.Typer(help="Work with machine config files offline.", no_args_is_help=True)


@app.command("patch")
def patch(
    config: Annotated[Path, typer.Argument(help="Machine config file to patch.")],
    patches: Annotated[
        list[str],
        typer.Option("-p", "--patch", help="Patch: @file or inline YAML; repeat to apply several."),
    ],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here instead of stdout.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
) -> None:
    """Apply patches to a config, validate the result, and print or write it."""
    from basalt.machinery.config import load_bundle, load_patch, patch_and_check

    source = str(config)
    bundle = load_bundle(read_text(config, "config"), source)
    loaded = [load_patch(p, index=i) for i, p in enumerate(patches, start=1)]
    from basalt.machinery.config import MachineConfig

    result, warnings = patch_and_check(
        bundle.to_raw(),
        loaded,
        target=f"{source} (patched)",
        complete=bundle.first(MachineConfig) is not None,
    )
    for problem in warnings:
        warn(problem.render())
    text = result.to_yaml()
    if output is None or str(output) == "-":
        sys.stdout.write(text)
        return
    refuse_overwrite([output], force)
    write_outputs({output: text})
