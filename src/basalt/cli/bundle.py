"""``basaltctl bundle``: create and verify signed upgrade bundles (offline, no node needed)."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ._common import info, read_text, refuse_overwrite

if TYPE_CHECKING:
    from basalt.machinery.images import VerificationKey, VerifiedBundle

app = typer.Typer(help="Create and verify signed upgrade bundles.", no_args_is_help=True)


class Format(StrEnum):
    text = "text"
    json = "json"


ArchOption = Annotated[str, typer.Option("--arch", help="Target architecture: x86_64 or aarch64.")]


def _named_files(values: list[str]) -> dict[str, Path]:
    from basalt.machinery.errors import BasaltError

    named: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise BasaltError(
                f"--file {value!r} is not NAME=PATH", hint="e.g. --file dtb=board.dtb"
            )
        named[name] = Path(path)
    return named


@app.command("create")
def create(
    kernel: Annotated[Path, typer.Option("--kernel", help="Kernel image (payload 'kernel').")],
    initramfs: Annotated[
        Path, typer.Option("--initramfs", help="Initramfs (payload 'initramfs').")
    ],
    rootfs: Annotated[
        Path, typer.Option("--rootfs", help="Root filesystem (payload 'rootfs.squashfs').")
    ],
    version: Annotated[str, typer.Option("--version", help="Basalt version, e.g. 0.2.0.")],
    key: Annotated[Path, typer.Option("--key", help="Signing key (PREFIX.key).")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Bundle to write: NAME.tar, or a directory.")
    ],
    arch: ArchOption = "x86_64",
    schematic_id: Annotated[
        str, typer.Option("--schematic-id", help="Content id of the image's schematic.")
    ] = "default",
    extra: Annotated[
        list[str] | None,
        typer.Option("--file", help="More payload as NAME=PATH (repeat)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle.")] = False,
) -> None:
    """Hash, sign and write a bundle. SOURCE_DATE_EPOCH fixes its creation time.

    Same inputs, key and SOURCE_DATE_EPOCH give a byte-identical bundle.
    """
    from basalt.machinery.errors import BasaltError
    from basalt.machinery.images import (
        INITRAMFS,
        KERNEL,
        ROOTFS,
        create_bundle,
        key_id,
        load_signing_key,
    )

    files = {KERNEL: kernel, INITRAMFS: initramfs, ROOTFS: rootfs}
    for name, path in _named_files(extra or []).items():
        if name in files:
            raise BasaltError(f"--file {name}= repeats a payload name", hint="choose another name")
        files[name] = path
    signing_key = load_signing_key(read_text(key, "signing key"), str(key))
    refuse_overwrite([output], force)
    manifest = create_bundle(
        output, files, version, schematic_id, arch, signing_key, overwrite=force
    )
    info(f"wrote {output}")
    print(
        f"bundle {output}: basalt {manifest.version} {manifest.architecture}, "
        f"{len(manifest.files)} files, {manifest.total_size} bytes, "
        f"signed by {key_id(signing_key)}"
    )


def _keys(key_files: list[Path], config: Path | None) -> list[VerificationKey]:
    from basalt.machinery.config import load_bundle
    from basalt.machinery.errors import BasaltError
    from basalt.machinery.images import trusted_keys_from_config, verification_key

    keys = [verification_key(read_text(p, "public key"), p.name) for p in key_files]
    if config is not None:
        keys += trusted_keys_from_config(load_bundle(read_text(config, "config"), str(config)))
    if not keys:
        raise BasaltError(
            "no trusted keys: every bundle would be refused",
            hint="pass --key PREFIX.pub, or --config with an ImageVerificationConfig",
        )
    return keys


def _summary(verified: VerifiedBundle) -> dict[str, object]:
    manifest = verified.manifest
    return {
        "bundle": str(verified.source),
        "form": verified.form,
        "version": manifest.version,
        "schematicId": manifest.schematic_id,
        "architecture": manifest.architecture,
        "created": manifest.created,
        "keyId": verified.key.key_id,
        "keyName": verified.key.name,
        "manifestSha256": verified.manifest_sha256,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest.files],
    }


@app.command("verify")
def verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle: a .tar file or a directory.")],
    key: Annotated[
        list[Path] | None, typer.Option("--key", help="Trusted public key file (repeat).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Machine config whose ImageVerificationConfig to trust."),
    ] = None,
    arch: ArchOption = "x86_64",
    output: Annotated[Format, typer.Option("-o", "--output", help="text or json.")] = Format.text,
) -> None:
    """Check a bundle as a node would: signature, trusted key, architecture, every file.

    Exits 1 naming the failed check; nothing is written either way.
    """
    from basalt.machinery.images import verify_bundle

    verified = verify_bundle(bundle, _keys(key or [], config), arch)
    summary = _summary(verified)
    if output is Format.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return
    print(f"verified {bundle}")
    for label, field in (
        ("version", "version"),
        ("schematic", "schematicId"),
        ("architecture", "architecture"),
        ("created", "created"),
    ):
        print(f"  {label:<13} {summary[field]}")
    print(f"  {'signed by':<13} {verified.key.label}")
    for f in verified.manifest.files:
        print(f"  {f.path:<16} {f.size:>12}  sha256 {f.sha256}")
