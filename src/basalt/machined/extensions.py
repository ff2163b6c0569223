"""System extensions on a node: mount the image's extensions, run their services.

The initramfs leaves the image's extensions (``NAME.sqfs``) and its schematic record
(``schematic.json``) on a read-only tmpfs at ``/usr/lib/basalt/extensions``, with an
empty directory ``NAME`` beside each image. On the metal platform, :func:`mount_extensions`
attaches each image to a loop device and mounts it read-only on its directory, then reads
its ``manifest.yaml``; :func:`extension_services` turns the manifests' services into
supervised services. A service runs its command from the extension's tree with
``LD_LIBRARY_PATH`` pointing at the extension's libraries; the root's loader and libc
serve the rest (docs/adr/0012-extensions.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from basalt.machinery.errors import BasaltError
from basalt.machinery.image_layout import EXTENSIONS_DIR, SCHEMATIC_FILE
from basalt.machinery.schematic import (
    VIRTIO_PORT_PLACEHOLDER,
    ExtensionManifest,
    ExtensionService,
    parse_manifest,
)

if TYPE_CHECKING:
    from .services import LogBuffer, Running, ServiceSpec

__all__ = [
    "MountedExtension",
    "extension_services",
    "find_virtio_port",
    "mount_extensions",
    "schematic_record",
]

log = logging.getLogger(__name__)

#: Library directories inside an extension, searched before the root's.
LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib")


@dataclass(frozen=True)
class MountedExtension:
    """One extension mounted at ``root`` (``/usr/lib/basalt/extensions/NAME``)."""

    manifest: ExtensionManifest
    root: Path
    device: str


def schematic_record(root: Path = Path("/")) -> dict[str, Any]:
    """The image's schematic record (id, extensions, extraKernelArgs); {} when the
    image carries none (container mode, an image older than schematics)."""
    try:
        record: dict[str, Any] = json.loads((root / EXTENSIONS_DIR / SCHEMATIC_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def mount_extensions(root: Path = Path("/")) -> tuple[list[MountedExtension], list[str]]:
    """Mount every ``*.sqfs`` in :data:`EXTENSIONS_DIR` (idempotent) and read its manifest.

    Returns (mounted extensions, one reason per extension that failed); a failed
    extension does not stop the boot.
    """
    from .sys import loop, mount

    directory = root / EXTENSIONS_DIR
    mounted: list[MountedExtension] = []
    failed: list[str] = []
    for image in sorted(directory.glob("*.sqfs")) if directory.is_dir() else []:
        target = directory / image.stem
        try:
            device = "(already mounted)"
            if not mount.is_mounted(target):
                with loop.attach_read_only(image, root / "dev") as attached:
                    device = str(attached.device)
                    mount.mount(device, target, "squashfs", mount.MS_RDONLY | mount.MS_NODEV)
            manifest = parse_manifest(
                (target / "manifest.yaml").read_text(), source=f"{image.name}:manifest.yaml"
            )
            if manifest.name != image.stem:
                raise BasaltError(f"{image.name}: its manifest names {manifest.name!r}")
        except (OSError, BasaltError) as exc:
            failed.append(f"extension {image.stem}: {exc}")
            continue
        mounted.append(MountedExtension(manifest, target, device))
    return mounted, failed


def find_virtio_port(name: str, root: Path = Path("/")) -> Path | None:
    """``/dev/vportNpM`` of the virtio-serial port named ``name`` (from sysfs; no udev)."""
    ports = root / "sys/class/virtio-ports"
    try:
        entries = sorted(ports.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            if (entry / "name").read_text().strip() == name:
                return root / "dev" / entry.name
        except OSError:
            continue
    return None


class ExtensionRunner:
    """Runs one extension service: resolves its virtio port and state directory at each
    start, then runs the command as a child process with the extension's libraries."""

    def __init__(self, extension: MountedExtension, service: ExtensionService, root: Path):
        self.extension = extension
        self.service = service
        self.root = root

    def __repr__(self) -> str:
        return f"ExtensionRunner({self.extension.manifest.name}/{self.service.name})"

    def argv(self) -> list[str]:
        """The command line; raises :class:`BasaltError` when its virtio port is absent."""
        service = self.service
        port = ""
        if service.virtio_port:
            found = find_virtio_port(service.virtio_port, self.root)
            if found is None:
                raise BasaltError(f"no virtio-serial port named {service.virtio_port}")
            port = str(found)
        program = self.extension.root / service.command.lstrip("/")
        return [str(program), *(a.replace(VIRTIO_PORT_PLACEHOLDER, port) for a in service.args)]

    def environment(self) -> dict[str, str]:
        libraries = ":".join(str(self.extension.root / d) for d in LIBRARY_DIRS)
        return {"PATH": "/usr/bin:/usr/sbin", "LANG": "C.UTF-8", "LD_LIBRARY_PATH": libraries}

    async def start(self, log: LogBuffer) -> Running:
        from .services import ProcessRunner

        if self.service.state_directory:
            state = self.root / self.service.state_directory.lstrip("/")
            state.mkdir(parents=True, exist_ok=True)
        return await ProcessRunner(self.argv(), env=self.environment()).start(log)


_RESTART = {"always": "always", "onFailure": "on_failure", "never": "never"}


def extension_services(extensions: Iterable[MountedExtension], root: Path) -> list[ServiceSpec]:
    """Service specs of every service of ``extensions`` (those the platform mounted)."""
    from .services import RestartPolicy, ServiceSpec

    specs = []
    for extension in extensions:
        for service in extension.manifest.services:
            runner = ExtensionRunner(extension, service, root)

            def skip(service: ExtensionService = service) -> str | None:
                if service.virtio_port and find_virtio_port(service.virtio_port, root) is None:
                    return (
                        f"no virtio-serial port named {service.virtio_port} "
                        "(the machine has no channel for it)"
                    )
                return None

            specs.append(
                ServiceSpec(
                    id=service.name,
                    runner=runner,
                    restart=RestartPolicy(_RESTART[service.restart]),
                    skip_reason=skip,
                )
            )
    return specs


def mount_and_log(root: Path) -> list[MountedExtension]:
    """:func:`mount_extensions`, with what it did on the log (for the platform)."""
    mounted, failed = mount_extensions(root)
    for extension in mounted:
        manifest = extension.manifest
        log.info(
            "extension %s %s mounted from %s (%d services)",
            manifest.name,
            manifest.version,
            extension.device,
            len(manifest.services),
        )
    for reason in failed:
        log.error("%s", reason)
    return mounted
