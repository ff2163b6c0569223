"""``basaltctl extension``: build, sign and inspect custom system extensions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ._common import info

app = typer.Typer(help="Build and inspect custom system extensions.", no_args_is_help=True)


def _image_root(cache: Path | None, lock_path: Path | None) -> Path:
    """The root tree of the image that image.lock describes (built once, then cached)."""
    from basalt.imager import lock as lockfile
    from basalt.imager import pipeline
    from basalt.imager.stage import Cache

    path = lock_path or lockfile.DEFAULT_LOCK
    lock = lockfile.read(path)
    lockfile.check(lock, path)
    stages = pipeline.Pipeline.from_lock(lock)
    return Cache(cache or pipeline.DEFAULT_CACHE).output(stages.rootfs) / "root"


@app.command("build")
def build(
    source: Annotated[
        Path,
        typer.Argument(help="A directory with manifest.yaml and rootfs/, or an OCI image layout."),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="The signed NAME.sqfs to write.")],
    signing_key: Annotated[
        Path,
        typer.Option(
            "--signing-key", help="Ed25519 key (PREFIX.key from 'basaltctl gen signing-key')."
        ),
    ],
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="Check libraries and fixed paths against this root tree [the image's root, "
            "built from image.lock into the stage cache].",
        ),
    ] = None,
    cache: Annotated[Path | None, typer.Option("--cache", help="Stage cache [_out/cache].")] = None,
    lock_path: Annotated[
        Path | None, typer.Option("--lock", help="The lock file [image.lock at the repo root].")
    ] = None,
) -> None:
    """Check an extension source, then write it as a reproducible, signed squashfs.

    Every problem is listed with its path (manifest fields, missing commands, libraries
    neither the image nor the extension has, fixed paths the root already has); nothing
    is written then. Prints the extension's sha256, which a schematic pins.
    """
    from basalt.imager.custom import build_extension
    from basalt.imager.pipeline import read_signing_key

    key = read_signing_key(signing_key)  # before any work
    tree = root if root is not None else _image_root(cache, lock_path)
    signed, manifest = build_extension(source, output, key, tree)
    info(f"extension {signed.name} {signed.version}: {output} ({signed.squashfs_bytes} bytes)")
    for service in manifest.services:
        info(f"  service   {service.name}: {service.command}")
    for path in manifest.provides:
        info(f"  provides  {path}")
    info(f"  signed by key {signed.key_id}")
    info("pin it in a schematic:")
    info("  customExtensions:")
    info(f"    - path: {output}")
    info(f"      sha256: {signed.sha256}")
    print(signed.sha256)


@app.command("inspect")
def inspect(
    path: Annotated[Path, typer.Argument(help="A signed extension file (NAME.sqfs).")],
    key: Annotated[
        list[Path] | None,
        typer.Option("--key", help="Also verify the signature with this public key (repeatable)."),
    ] = None,
) -> None:
    """Name, version, sha256 and signing key of an extension file (and, with --key,
    whether its signature verifies)."""
    from basalt.imager.custom import read_signed, verify_extension
    from basalt.machinery.images import verification_key

    if key:
        trusted = [verification_key(p.read_bytes(), p.name) for p in key]
        signed = verify_extension(path, trusted)
    else:
        signed = read_signed(path)
    data = {**signed.to_data(), "verified": bool(key)}
    print(json.dumps(data, indent=2, sort_keys=True))
