"""The factory's state directory: what lies where, and the few files it writes.

::

    STATE/
      cache/                      the imager's stage cache (one build at a time uses it)
      schematics/ID.yaml          every schematic posted, canonical YAML (0600: some
                                  carry a join token)
      images/ID/VERSION/          a finished build: the artefacts, image.json, build.log,
                                  artefacts.json (each artefact's size and sha256)
      images/ID/VERSION.build/    the build under way (or the last failed one, with its log)
      extensions/SHA256.sqfs      signed custom extensions, by their content id
      extensions/SHA256.json      what the signature said (name, version, key id)

A finished image directory appears by one rename, so a half-built image is never
served; ``artefacts.json`` is written last inside it (by the build process).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basalt.machinery.errors import BasaltError
from basalt.machinery.fileio import write_atomic
from basalt.machinery.schematic import CustomExtensionRef, Schematic, parse_schematic

log = logging.getLogger("basalt.factory")

#: What the factory serves of an image, in the order the index page lists them.
ARTEFACTS: tuple[str, ...] = ("vmlinuz", "initrd.img", "disk.raw.zst", "disk.qcow2", "bundle.tar")
MEDIA_TYPES = {
    "vmlinuz": "application/octet-stream",
    "initrd.img": "application/octet-stream",
    "disk.raw.zst": "application/zstd",
    "disk.qcow2": "application/octet-stream",
    "bundle.tar": "application/x-tar",
}
#: Only in an image built with a signing key.
SIGNED_ARTEFACT = "bundle.tar"
ARTEFACTS_FILE = "artefacts.json"
BUILD_LOG = "build.log"

_ID = re.compile(r"^[0-9a-f]{64}$")


def is_content_id(text: str) -> bool:
    """Whether ``text`` is a sha256 in hex: a schematic's or an extension's id."""
    return bool(_ID.match(text))


@dataclass(frozen=True)
class ArtefactFile:
    """One file of a finished image."""

    name: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class StoredExtension:
    """A custom extension in the registry, as its signature described it."""

    sha256: str
    name: str
    version: str
    key_id: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "name": self.name,
            "version": self.version,
            "keyId": self.key_id,
            "bytes": self.size,
        }


def stored_form(schematic: Schematic) -> Schematic:
    """``schematic`` as the factory keeps it: custom extensions by sha256 only (a
    client's file path means nothing here; the registry has the file)."""
    refs = tuple(CustomExtensionRef(ref.sha256) for ref in schematic.custom_extensions)
    return Schematic(schematic.extra_kernel_args, schematic.extensions, refs)


class Store:
    """The files under one state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"
        self.schematics = root / "schematics"
        self.images = root / "images"
        self.extensions = root / "extensions"
        for directory in (root, self.cache, self.schematics, self.images, self.extensions):
            directory.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)

    # -- schematics --------------------------------------------------------------------------
    def load_schematics(self) -> dict[str, Schematic]:
        """Every stored schematic by id; a file that no longer parses is logged and left."""
        found: dict[str, Schematic] = {}
        for path in sorted(self.schematics.glob("*.yaml")):
            try:
                schematic = parse_schematic(path.read_text(), str(path))
            except (OSError, BasaltError) as exc:
                log.warning("skipping schematic %s: %s", path, exc)
                continue
            if schematic.id != path.stem:
                log.warning("skipping schematic %s: its content has id %s", path, schematic.id)
                continue
            found[schematic.id] = schematic
        return found

    def save_schematic(self, schematic: Schematic) -> None:
        write_atomic(self.schematics / f"{schematic.id}.yaml", schematic.to_yaml(), mode=0o600)

    def schematic_file(self, schematic_id: str) -> Path:
        return self.schematics / f"{schematic_id}.yaml"

    # -- images ------------------------------------------------------------------------------
    def image_dir(self, schematic_id: str, version: str) -> Path:
        return self.images / schematic_id / version

    def work_dir(self, schematic_id: str, version: str) -> Path:
        return self.images / schematic_id / f"{version}.build"

    def artefacts(self, schematic_id: str, version: str) -> dict[str, ArtefactFile] | None:
        """The files of a finished image (None when it was not built)."""
        directory = self.image_dir(schematic_id, version)
        try:
            described = json.loads((directory / ARTEFACTS_FILE).read_text())
        except FileNotFoundError:
            return None
        return {
            name: ArtefactFile(name, directory / name, int(d["bytes"]), str(d["sha256"]))
            for name, d in described.items()
            if name in ARTEFACTS
        }

    def install(self, schematic_id: str, version: str, built: Path) -> None:
        """Make ``built`` (a complete image directory) the image, by one rename."""
        target = self.image_dir(schematic_id, version)
        if target.exists():  # a rebuild: the old one goes aside first, then away
            old = target.with_name(f"{version}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        built.rename(target)

    # -- extensions --------------------------------------------------------------------------
    def extension_file(self, sha256: str) -> Path:
        return self.extensions / f"{sha256}.sqfs"

    def list_extensions(self) -> list[StoredExtension]:
        found = []
        for path in sorted(self.extensions.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                size = self.extension_file(path.stem).stat().st_size
            except (OSError, ValueError) as exc:
                log.warning("skipping extension %s: %s", path, exc)
                continue
            found.append(
                StoredExtension(
                    path.stem, str(data["name"]), str(data["version"]), str(data["keyId"]), size
                )
            )
        return sorted(found, key=lambda e: (e.name, e.version, e.sha256))

    def add_extension(self, upload: Path, described: StoredExtension) -> None:
        """Move a verified ``upload`` into the registry (its description first: a file
        without one is not listed)."""
        write_atomic(
            self.extensions / f"{described.sha256}.json",
            json.dumps(described.to_json(), indent=2, sort_keys=True) + "\n",
        )
        os.replace(upload, self.extension_file(described.sha256))


__all__ = [
    "ARTEFACTS",
    "MEDIA_TYPES",
    "ArtefactFile",
    "Store",
    "StoredExtension",
    "is_content_id",
    "stored_form",
]
