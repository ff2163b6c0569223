"""System extensions: one reproducible squashfs per extension, and the initramfs segment
that carries them (with the schematic) to the node.

An extension is built from the locked Debian packages by a :class:`Recipe`: its programs,
the shared libraries they need that the root does not already ship (resolved from ELF,
as for the root), and ``manifest.yaml`` (name, version = the package's version, the
services it adds; :mod:`basalt.machinery.schematic` parses it on both sides). The
squashfs is made with the root's flags (sorted, root-owned, SOURCE_DATE_EPOCH).

The boot stage appends :func:`append_segment`'s uncompressed cpio to the initramfs (the
kernel unpacks concatenated segments): ``/extensions/NAME.sqfs`` and
``/extensions/schematic.json``. The initramfs init copies them to a tmpfs on the root's
``/usr/lib/basalt/extensions``; machined mounts each one (docs/adr/0012-extensions.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basalt.machinery.image_layout import SCHEMATIC_FILE
from basalt.machinery.schematic import (
    OFFICIAL_EXTENSIONS,
    ExtensionManifest,
    ExtensionService,
    Schematic,
    parse_manifest,
)

from . import cpio, libs
from .errors import ImageBuildError
from .lock import Lock
from .packages import Unpack, copy_file
from .rootfs import Rootfs
from .squashfs import SOURCE_DATE_EPOCH, Squashfs, make_squashfs
from .stage import Cache, Stage, run_tool, sha256_file, walk_sorted

#: Where the initramfs segment puts the extensions and the schematic record.
SEGMENT_DIR = "extensions"


@dataclass(frozen=True)
class Recipe:
    """How to build one extension: the package it comes from, the programs it takes from
    the unpacked packages, and the services of its manifest (version filled in at build)."""

    name: str
    package: str
    programs: tuple[str, ...]
    description: str
    services: tuple[ExtensionService, ...]


#: qemu-ga talks to the host over a virtio-serial port. There is no udev, so the port is
#: found by its name in sysfs when the service starts ({virtioPort}); its state directory
#: and pid file live under /run, as the root is read-only.
QEMU_GUEST_AGENT = Recipe(
    name="qemu-guest-agent",
    package="qemu-guest-agent",
    programs=("usr/sbin/qemu-ga",),
    description="QEMU guest agent: lets the host ping, query and shut down the guest",
    services=(
        ExtensionService(
            name="ext-qemu-guest-agent",
            command="/usr/sbin/qemu-ga",
            args=(
                *("--method", "virtio-serial", "--path", "{virtioPort}"),
                *("--statedir", "/run/qemu-ga", "--pidfile", "/run/qemu-ga/qemu-ga.pid"),
            ),
            restart="always",
            virtio_port="org.qemu.guest_agent.0",
            state_directory="/run/qemu-ga",
        ),
    ),
)

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (QEMU_GUEST_AGENT,)}
assert tuple(sorted(RECIPES)) == tuple(sorted(OFFICIAL_EXTENSIONS)), "recipes != catalogue"


@dataclass(frozen=True)
class Extension(Stage):
    """``NAME.sqfs``, its ``tree/`` and ``extension.json`` (name, version, files, libraries)."""

    name = "extension"
    unpack: Unpack
    rootfs: Rootfs
    recipe: Recipe
    #: The version of the recipe's package in the lock: the extension's version.
    package_version: str
    compression: str = Squashfs.compression
    level: int = Squashfs.level
    block_size: str = Squashfs.block_size
    epoch: int = SOURCE_DATE_EPOCH

    @property
    def extension_name(self) -> str:
        return self.recipe.name

    @property
    def manifest(self) -> ExtensionManifest:
        recipe = self.recipe
        return ExtensionManifest(
            recipe.name, self.package_version, recipe.description, recipe.services
        )

    def run(self, out: Path, cache: Cache) -> None:
        tree = cache.output(self.unpack) / "tree"
        root = cache.output(self.rootfs) / "root"
        staging = out / "tree"
        for program in self.recipe.programs:
            if not (tree / program).is_file():
                raise ImageBuildError(
                    f"extension {self.recipe.name}: {program} is not in package "
                    f"{self.recipe.package}",
                    hint="check the recipe in basalt/imager/extensions.py against the package",
                )
            copy_file(tree / program, staging / program)
        resolution = libs.closure([staging / p for p in self.recipe.programs], tree, staging)
        if resolution.missing:
            raise ImageBuildError(
                f"extension {self.recipe.name}: libraries not in the locked packages: "
                + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(resolution.missing.items()))
            )
        # What the root ships already is used from the root (the loader is the root's).
        own = [rel for rel in resolution.copied if not _in_tree(root, rel)]
        libs.install(libs.Resolution(copied=own), tree, staging)
        text = self.manifest.to_yaml()
        if parse_manifest(text) != self.manifest:  # what the node will read back
            raise ImageBuildError(f"extension {self.recipe.name}: manifest does not round-trip")
        (staging / "manifest.yaml").write_text(text)
        _normalize(staging, self.recipe.programs)
        image = out / f"{self.recipe.name}.sqfs"
        make_squashfs(
            staging,
            image,
            compression=self.compression,
            level=self.level,
            block_size=self.block_size,
            epoch=self.epoch,
        )
        info = {
            "name": self.recipe.name,
            "version": self.package_version,
            "package": self.recipe.package,
            "libraries": sorted(own),
            "bytes": image.stat().st_size,
            "sha256": sha256_file(image),
        }
        (out / "extension.json").write_text(json.dumps(info, indent=2) + "\n")


def _in_tree(tree: Path, relative: str) -> bool:
    return (tree / relative).exists() or (tree / relative).is_symlink()


def _normalize(staging: Path, programs: tuple[str, ...]) -> None:
    runnable = {staging / p for p in programs}
    for path in walk_sorted(staging):
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() or path in runnable else 0o644)


@dataclass(frozen=True)
class CustomExtension(Stage):
    """A custom extension (a signed file, see :mod:`.custom`) taken into the image:
    ``NAME.sqfs`` (the file as signed), its ``tree/`` and ``extension.json``.

    Its id is its content (name and sha256); where the file was read from is not part
    of it, so the CLI and a factory share cache entries and give the same bytes."""

    name = "custom-extension"
    version = 2  # 2: extension.json lists the services
    extension: str
    sha256: str
    #: The host path of the verified file; not part of the stage id.
    source: str = dataclasses.field(default="", compare=False)

    @property
    def extension_name(self) -> str:
        return self.extension

    def canonical_form(self) -> dict[str, Any]:
        form = super().canonical_form()
        del form["options"]["source"]
        return form

    def run(self, out: Path, cache: Cache) -> None:
        image = out / f"{self.extension}.sqfs"
        shutil.copyfile(self.source, image)
        if sha256_file(image) != self.sha256:
            raise ImageBuildError(
                f"extension {self.extension}: {self.source} changed while the image was built",
                hint="build again",
            )
        from .custom import read_signed

        signed = read_signed(image)
        tree = out / "tree"
        run_tool(
            ["unsquashfs", "-no-progress", "-quiet", "-no-xattrs", "-d", str(tree), str(image)],
            what="unsquashfs",
        )
        manifest = parse_manifest(
            (tree / "manifest.yaml").read_text(), source=f"{self.extension}.sqfs:manifest.yaml"
        )
        if manifest.name != self.extension:
            raise ImageBuildError(
                f"{self.source}: its manifest names {manifest.name!r}, its signature "
                f"{self.extension!r}",
                hint="rebuild the extension",
            )
        info = {
            "name": manifest.name,
            "version": manifest.version,
            "custom": True,
            "keyId": signed.key_id,
            "provides": list(manifest.provides),
            "services": [service.name for service in manifest.services],
            "libraries": [],
            "bytes": image.stat().st_size,
            "sha256": self.sha256,
        }
        (out / "extension.json").write_text(json.dumps(info, indent=2) + "\n")


def extension_stages(
    schematic: Schematic, lock: Lock, unpack: Unpack, rootfs: Rootfs
) -> tuple[Extension, ...]:
    """The :class:`Extension` stage of every extension ``schematic`` names."""
    versions = {deb.name: deb.version for deb in lock.debs}
    stages = []
    for name in schematic.extensions:
        recipe = RECIPES[name]  # the schematic parser accepts only names in RECIPES
        if recipe.package not in versions:
            raise ImageBuildError(
                f"extension {name}: package {recipe.package} is not in image.lock",
                hint="add it to DEBIAN_PACKAGES in basalt/imager/lock.py and run "
                "'basaltctl image lock'",
            )
        stages.append(Extension(unpack, rootfs, recipe, versions[recipe.package]))
    return tuple(stages)


def schematic_json(schematic: Schematic) -> str:
    """The schematic record the node reads (``schematic.json``): id, extensions, args.
    The boot stage adds ``sha256`` (each shipped extension file's), which the node
    checks before it mounts one."""
    return json.dumps(schematic.record(), sort_keys=True) + "\n"


def with_digests(record: str, images: list[Path]) -> str:
    """``record`` (schematic.json) with the sha256 of each of ``images`` by name."""
    data = json.loads(record)
    data["sha256"] = {image.stem: sha256_file(image) for image in images}
    return json.dumps(data, sort_keys=True) + "\n"


def append_segment(initrd: Path, images: list[Path], record: str, workdir: Path) -> int:
    """Append an uncompressed cpio with ``extensions/`` (the squashfs ``images`` and
    ``schematic.json`` holding ``record``) to ``initrd``; return its entry count.

    The compressed segment before it is padded with zeros to a 4-byte boundary, where
    the kernel looks for the next archive."""
    staging = workdir / "segment"
    target = staging / SEGMENT_DIR
    target.mkdir(parents=True)
    (target / SCHEMATIC_FILE).write_text(record)
    for image in images:
        shutil.copyfile(image, target / image.name)
    for path in walk_sorted(staging):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    with initrd.open("ab") as stream:
        stream.write(b"\0" * (-stream.tell() % 4))
        entries = cpio.write(staging, stream, SOURCE_DATE_EPOCH)
    shutil.rmtree(staging)
    return entries


def describe(stage_dir: Path) -> dict[str, Any]:
    """``extension.json`` of a built :class:`Extension` stage."""
    described: dict[str, Any] = json.loads((stage_dir / "extension.json").read_text())
    return described
