"""One factory: its state directory, schematics, the build queue and what it serves.

Built once by ``basalt-factory serve`` (or by ``basalt-fleet``, which mounts the same
factory under ``/factory/``); the HTTP routes (``routes.py``) are thin over it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import basalt
from basalt.machinery.errors import BasaltError, ConfigSyntaxError, Problem
from basalt.machinery.schematic import Schematic, SchematicError, parse_schematic

from .builds import BuildFunction, BuildKey, BuildQueue, BuildStatus
from .errors import (
    BuildFailed,
    ExtensionRefused,
    FactoryOptionError,
    NoSigningKey,
    UnknownArtefact,
    UnknownSchematic,
    UnknownVersion,
)
from .redact import is_secret, shown_record
from .store import (
    ARTEFACTS,
    ARTEFACTS_FILE,
    SIGNED_ARTEFACT,
    ArtefactFile,
    Store,
    StoredExtension,
    is_content_id,
    stored_form,
)

log = logging.getLogger("basalt.factory")

#: A schematic is a few lines; a body larger than this is refused before parsing.
MAX_SCHEMATIC_BYTES = 64 * 1024
#: Largest extension file accepted.
MAX_EXTENSION_BYTES = 1 << 30


@dataclass(frozen=True)
class FactoryOptions:
    """How a factory is started (``basalt-factory serve``'s options)."""

    state: Path
    #: image.lock: what every image is built from (the repository's by default).
    lock: Path
    #: A ``basaltctl gen signing-key`` .key file: images get bundle.tar.
    signing_key: Path | None = None
    #: Public keys trusted to sign custom extensions (uploads and builds).
    extension_keys: tuple[Path, ...] = ()


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FactoryOptionError(
            f"{what} {path}: {exc.strerror}",
            hint="pass a key file written by 'basaltctl gen signing-key -o PREFIX'",
        ) from None


class Factory:
    """The factory's state and operations; safe to call from the event loop (nothing here
    blocks for long: builds run on the queue's worker)."""

    def __init__(self, options: FactoryOptions, build: BuildFunction | None = None) -> None:
        from basalt.machinery.images import key_id, load_signing_key, verification_key

        self.options = options
        self.version = basalt.__version__
        self.signing_key_id: str | None = None
        if options.signing_key is not None:
            raw = _read_key_file(options.signing_key, "signing key")
            self.signing_key_id = key_id(load_signing_key(raw, str(options.signing_key)))
        self.trusted = tuple(
            verification_key(_read_key_file(path, "extension key"), path.name)
            for path in options.extension_keys
        )
        self.store = Store(options.state)
        self.schematics: dict[str, Schematic] = self.store.load_schematics()
        if build is None:
            from .runner import BuildInputs, ImagerRunner

            inputs = BuildInputs(options.lock, options.signing_key, options.extension_keys)
            build = ImagerRunner(self.store, inputs)
        self.builds = BuildQueue(build, self.is_built)
        self._finished: dict[BuildKey, tuple[int, int, dict[str, ArtefactFile]]] = {}

    @property
    def versions(self) -> tuple[str, ...]:
        """The Basalt versions this factory builds: its own."""
        return (self.version,)

    # -- schematics --------------------------------------------------------------------------
    def add_schematic(self, text: str, source: str = "schematic") -> tuple[Schematic, bool]:
        """Parse and store a schematic; (it, whether it is new). Raises
        :class:`~basalt.machinery.schematic.SchematicError` (every problem) or
        :class:`~basalt.machinery.errors.ConfigSyntaxError`; nothing is stored then."""
        schematic = stored_form(parse_schematic(text, source))
        missing = [
            Problem(
                "schematic",
                "customization.systemExtensions.customExtensions",
                f"extension sha256 {ref.sha256} is not in this factory's registry",
                hint="upload the signed file first (POST /extensions; 'basaltctl image build "
                "--factory' does it for extensions given by path)",
                source=source,
            )
            for ref in schematic.custom_extensions
            if not self.store.extension_file(ref.sha256).is_file()
        ]
        if missing:
            raise SchematicError(missing, source=source)
        if schematic.id in self.schematics:
            return self.schematics[schematic.id], False
        self.store.save_schematic(schematic)
        self.schematics[schematic.id] = schematic
        shown = "(secret kernel arguments)" if is_secret(schematic) else ""
        log.info("schematic %s stored %s", schematic.id, shown)
        return schematic, True

    def schematic(self, schematic_id: str) -> Schematic:
        found = self.schematics.get(schematic_id) if is_content_id(schematic_id) else None
        if found is None:
            raise UnknownSchematic(
                f"schematic {schematic_id!r} is not known to this factory",
                hint="POST the schematic YAML to /schematics first: it answers the id",
            )
        return found

    def key(self, schematic_id: str, version: str) -> BuildKey:
        """The image of a known schematic at a version this factory builds."""
        self.schematic(schematic_id)
        if version not in self.versions:
            raise UnknownVersion(
                f"version {version!r}: this factory builds Basalt {', '.join(self.versions)} "
                "only (from its image.lock)",
                hint=f"ask for /image/{schematic_id}/{self.version}/NAME, or run the factory "
                f"of Basalt {version}",
            )
        return BuildKey(schematic_id, version)

    # -- images ------------------------------------------------------------------------------
    def finished(self, key: BuildKey) -> dict[str, ArtefactFile] | None:
        """The artefacts of a finished build made with this factory's signing key."""
        marker = self.store.image_dir(key.schematic, key.version) / ARTEFACTS_FILE
        try:
            stat = marker.stat()
        except FileNotFoundError:
            return None
        known = self._finished.get(key)
        if known is not None and known[:2] == (stat.st_ino, stat.st_mtime_ns):
            return known[2]
        files = self.store.artefacts(key.schematic, key.version)
        if files is None:
            return None
        if self.signing_key_id is not None and (
            SIGNED_ARTEFACT not in files or self._bundle_key(key) != self.signing_key_id
        ):
            return None  # built without this factory's signing key: build again
        self._finished[key] = (stat.st_ino, stat.st_mtime_ns, files)
        return files

    def _bundle_key(self, key: BuildKey) -> str | None:
        try:
            manifest = json.loads(
                (self.store.image_dir(key.schematic, key.version) / "image.json").read_text()
            )
        except (OSError, ValueError):
            return None
        bundle = manifest.get("bundle") or {}
        return str(bundle.get("keyId")) if bundle.get("keyId") else None

    def is_built(self, key: BuildKey) -> bool:
        return self.finished(key) is not None

    def artefact(self, schematic_id: str, version: str, name: str) -> ArtefactFile | BuildStatus:
        """The file, if the image is built; else its build's status (the build is
        queued by this request unless it is already). Raises for an unknown schematic,
        version or name, for bundle.tar without a signing key, and for a failed build."""
        if name not in ARTEFACTS:
            raise UnknownArtefact(
                f"{name!r} is not an artefact of an image",
                hint=f"an image has: {', '.join(ARTEFACTS)}",
            )
        key = self.key(schematic_id, version)
        if name == SIGNED_ARTEFACT and self.signing_key_id is None:
            raise NoSigningKey(
                "bundle.tar: this factory has no signing key, so its images have no signed "
                "upgrade bundle",
                hint="start the factory with --signing-key PREFIX.key (basaltctl gen signing-key)",
            )
        files = self.finished(key)
        if files is not None:
            if name not in files:
                raise UnknownArtefact(
                    f"the build of {key} made no {name}",
                    hint="the image builder of this version does not write it",
                )
            return files[name]
        status = self.builds.request(key)
        if status.state == "failed":
            raise BuildFailed(
                f"the last build of image {key} failed: {status.error}",
                hint=f"POST /builds/{schematic_id}/{version} to build it again",
            )
        return status

    def status(self, schematic_id: str, version: str) -> BuildStatus:
        return self.builds.status(self.key(schematic_id, version))

    def start_build(self, schematic_id: str, version: str) -> BuildStatus:
        """Queue the image (again, if its last build failed); a built one stays built."""
        key = self.key(schematic_id, version)
        failed = self.builds.status(key).state == "failed"
        return self.builds.request(key, retry=failed)

    def links(self, schematic_id: str, prefix: str = "") -> dict[str, Any]:
        """Where a schematic's image (this factory's version) and its build are, below the
        mount point ``prefix``."""
        image = f"{prefix}/image/{schematic_id}/{self.version}"
        names = [n for n in ARTEFACTS if n != SIGNED_ARTEFACT or self.signing_key_id]
        return {
            "version": self.version,
            "versions": list(self.versions),
            "build": f"{prefix}/builds/{schematic_id}/{self.version}",
            "artefacts": {name: f"{image}/{name}" for name in names},
        }

    # -- extensions --------------------------------------------------------------------------
    def new_upload(self) -> Path:
        """A fresh file in the registry's directory to receive an upload."""
        fd, name = tempfile.mkstemp(prefix=".upload-", dir=self.store.extensions)
        os.close(fd)
        return Path(name)

    def add_extension(self, upload: Path) -> tuple[StoredExtension, bool]:
        """Verify an uploaded signed extension and keep it under its sha256; (it, new)."""
        from basalt.imager.custom import verify_extension

        try:
            if not self.trusted:
                raise ExtensionRefused(
                    "this factory trusts no extension signing key, so it takes no extension",
                    hint="start it with --extension-key PUB.pem (the key the extensions are "
                    "signed with)",
                )
            try:
                info = verify_extension(upload, self.trusted)
            except BasaltError as exc:
                raise ExtensionRefused(
                    exc.message.replace(str(upload), "the uploaded file"), hint=exc.hint
                ) from None
            described = StoredExtension(
                info.sha256, info.name, info.version, info.key_id, upload.stat().st_size
            )
            new = not self.store.extension_file(info.sha256).exists()
            self.store.add_extension(upload, described)
        finally:
            upload.unlink(missing_ok=True)
        log.info("extension %s %s stored as %s", info.name, info.version, info.sha256)
        return described, new

    # -- the index ---------------------------------------------------------------------------
    def image_info(self, schematic_id: str, version: str) -> dict[str, Any]:
        """An image's build state and, when built, its artefacts (name, bytes, sha256)."""
        key = BuildKey(schematic_id, version)
        status = self.builds.status(key)
        files = self.finished(key) or {}
        wanted = [n for n in ARTEFACTS if n != SIGNED_ARTEFACT or self.signing_key_id]
        return {
            "version": version,
            "build": status.to_json(),
            "artefacts": [
                {"name": n, "bytes": files[n].size, "sha256": files[n].sha256}
                if n in files
                else {"name": n, "bytes": None, "sha256": None}
                for n in wanted
            ],
        }

    def schematic_info(self, schematic: Schematic) -> dict[str, Any]:
        known = {e.sha256: e for e in self.store.list_extensions()}
        return {
            **shown_record(schematic),
            "customExtensionNames": {
                ref.sha256: f"{known[ref.sha256].name} {known[ref.sha256].version}"
                for ref in schematic.custom_extensions
                if ref.sha256 in known
            },
            "images": [self.image_info(schematic.id, v) for v in self.versions],
        }

    def index(self) -> dict[str, Any]:
        """Everything the index page shows; kernel arguments with secrets redacted."""
        schematics = sorted(self.schematics.values(), key=lambda s: s.id)
        return {
            "version": self.version,
            "versions": list(self.versions),
            "signingKey": self.signing_key_id,
            "extensionKeys": [k.key_id for k in self.trusted],
            "schematics": [self.schematic_info(s) for s in schematics],
            "extensions": [e.to_json() for e in self.store.list_extensions()],
        }

    def close(self) -> None:
        """Stop the build under way (its process group) and drop the queue."""
        self.builds.close()


def syntax_problem(exc: ConfigSyntaxError) -> dict[str, Any]:
    """A YAML syntax error as one problem of the schematic-error answer."""
    return {
        "path": "",
        "line": exc.line,
        "column": exc.column,
        "message": exc.message,
        "hint": exc.hint,
    }


__all__ = [
    "MAX_EXTENSION_BYTES",
    "MAX_SCHEMATIC_BYTES",
    "Factory",
    "FactoryOptions",
    "syntax_problem",
]
