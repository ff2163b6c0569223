"""``basaltctl image``: pin, build and inspect Basalt system images."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from ._common import info

app = typer.Typer(help="Lock, build and inspect system images.", no_args_is_help=True)

LockOption = Annotated[
    Path | None, typer.Option("--lock", help="The lock file [image.lock at the repo root].")
]


class Format(StrEnum):
    text = "text"
    json = "json"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


@app.command("lock")
def lock(lock_path: LockOption = None) -> None:
    """Resolve the Debian packages and wheels afresh and (re)write image.lock."""
    from basalt.imager import lock as lockfile

    written = lockfile.write(lock_path or lockfile.DEFAULT_LOCK)
    info(
        f"locked {len(written.debs)} Debian packages (kernel {written.kernel}) and "
        f"{len(written.wheels)} wheels in {lock_path or lockfile.DEFAULT_LOCK}"
    )


@app.command("build")
def build(
    out: Annotated[Path | None, typer.Option("--out", help="Image directory [_out/image].")] = None,
    cache: Annotated[Path | None, typer.Option("--cache", help="Stage cache [_out/cache].")] = None,
    lock_path: LockOption = None,
    schematic: Annotated[
        Path | None,
        typer.Option(
            "--schematic",
            help="Schematic YAML: system extensions and extra kernel args [none].",
        ),
    ] = None,
    signing_key: Annotated[
        Path | None,
        typer.Option(
            "--signing-key",
            help="Signing key (PREFIX.key from 'gen signing-key'): also write bundle.tar, "
            "the signed upgrade bundle [no bundle].",
        ),
    ] = None,
    extension_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--extension-key",
            help="Public key (PREFIX.pub) trusted to sign the schematic's custom "
            "extensions (repeatable).",
        ),
    ] = None,
    factory: Annotated[
        str | None,
        typer.Option(
            "--factory",
            help="Have this image factory build it (http://HOST:PORT, or a fleet's "
            "https://HOST:PORT/factory) and download the artefacts into --out.",
        ),
    ] = None,
) -> None:
    """Build the image from image.lock (cached stages are reused), or with --factory."""
    if factory is not None:
        from .factory_client import build_with_factory

        local = {"--cache": cache, "--lock": lock_path, "--signing-key": signing_key,
                 "--extension-key": extension_key}  # fmt: skip
        build_with_factory(factory, schematic, out, local)
        return
    import logging

    from basalt.imager import lock as lockfile
    from basalt.imager import pipeline
    from basalt.machinery.schematic import EMPTY, read_schematic

    chosen = read_schematic(schematic) if schematic else EMPTY  # before any build work
    sources = extension_sources(schematic, extension_key)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    target = out or pipeline.DEFAULT_OUT
    manifest = pipeline.build(
        target,
        cache or pipeline.DEFAULT_CACHE,
        lock_path or lockfile.DEFAULT_LOCK,
        schematic=chosen,
        signing_key=signing_key,
        extension_sources=sources,
    )
    for step in manifest["build"]:
        info(f"  {step['stage']:<13} {step['result']:<7} {step['seconds']:>6.1f} s")
    _print_text(target, manifest)


def extension_sources(schematic: Path | None, keys: list[Path] | None) -> Any:
    """Custom extensions are read relative to the schematic's directory and must be
    signed by one of ``keys``."""
    from basalt.imager.custom import ExtensionSources
    from basalt.machinery.errors import BasaltError
    from basalt.machinery.images import verification_key

    trusted = []
    for path in keys or []:
        try:
            trusted.append(verification_key(path.read_bytes(), path.name))
        except OSError as exc:
            raise BasaltError(
                f"extension key {path}: {exc.strerror}",
                hint="pass the PREFIX.pub that 'basaltctl gen signing-key' wrote",
            ) from None
    base = schematic.resolve().parent if schematic else None
    return ExtensionSources(trusted=tuple(trusted), base=base)


@app.command("inspect")
def inspect(
    image: Annotated[Path, typer.Argument(help="An image directory made by 'image build'.")],
    output: Annotated[Format, typer.Option("-o", "--output", help="text or json.")] = Format.text,
) -> None:
    """Size, package versions, squashfs sha256 and the executables of an image."""
    from basalt.imager import pipeline

    manifest = pipeline.inspect(image)
    if output is Format.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
    else:
        _print_text(image, manifest)


def _print_text(image: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    print(f"image:       {image} (basalt {manifest['version']})")
    print(f"kernel:      {manifest['kernel']['package']}")
    for name, described in files.items():
        print(f"{name + ':':<12} {_mib(described['bytes']):>10}  sha256 {described['sha256']}")
    total = sum(d["bytes"] for d in files.values())
    root = manifest["root"]
    print(f"total:       {_mib(total):>10}")
    print(
        f"root tree:   {_mib(root['bytes']):>10}  {root['files']} files, "
        f"squashfs {root['compression']}"
    )
    programs = manifest["executables"]
    extensions = manifest.get("extensions", [])
    schematic = manifest.get("schematic")
    print(f"schematic:   {schematic['id'] if schematic else '(none recorded)'}")
    bundle = manifest.get("bundle")
    if bundle:
        print(f"bundle:      basalt {bundle['version']}, signed by key {bundle['keyId']}")
    if schematic and schematic.get("extraKernelArgs"):
        print(f"kernel args: {' '.join(schematic['extraKernelArgs'])} (extra)")
    total_programs = len(programs) + sum(len(e["executables"]) for e in extensions)
    print(f"executables: {total_programs} ({len(programs)} in the root)")
    print(f"  root ({len(programs)}): {' '.join(programs)}")
    for extension in extensions:
        own = extension["executables"]
        print(f"  {extension['name']} ({len(own)}): {' '.join(own) or '-'}")
    print(f"extensions:  {len(extensions) or 'none'}")
    for extension in extensions:
        kind = f"custom, key {extension['keyId'][:16]}" if extension.get("custom") else "official"
        print(
            f"  {extension['name']:<24} {extension['version']:<28} "
            f"{_mib(extension['bytes']):>10}  sha256 {extension['sha256']}  ({kind})"
        )
        for path in extension.get("provides", []):
            print(f"    provides {path}")
    print("packages:")
    for name, version in sorted(manifest["packages"].items()):
        print(f"  {name:<36} {version}")
    print("wheels:")
    for name, version in sorted(manifest["wheels"].items()):
        print(f"  {name:<36} {version}")
