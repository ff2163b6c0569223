"""System extensions on a node: mount the image's extensions, run their services.

The initramfs leaves the image's extensions (``NAME.sqfs``) and its schematic record
(``schematic.json``) on a read-only tmpfs at ``/usr/lib/basalt/extensions``, with an
empty directory ``NAME`` beside each image. On the metal platform, :func:`mount_extensions`
checks each image against the sha256 the record holds for it, attaches it to a loop
device, mounts it read-only on its directory and reads its ``manifest.yaml``; then
:func:`mount_overlays` shows the files the manifests ``provide`` at fixed root paths
(``/usr/local/bin/kubelet``) through one read-only overlay per directory of
:data:`~basalt.machinery.image_layout.OVERLAY_DIRECTORIES`, refusing an extension whose
files would shadow the root's or another extension's (:func:`plan_overlays`).
:func:`extension_services` turns the manifests' services into supervised services. A
service runs its command from the extension's tree with ``LD_LIBRARY_PATH`` pointing at
the extension's libraries; the root's loader and libc serve the rest
(docs/adr/0012-extensions.md).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from basalt.machinery.errors import BasaltError
from basalt.machinery.fileio import sha256_file as file_sha256
from basalt.machinery.image_layout import EXTENSIONS_DIR, SCHEMATIC_FILE
from basalt.machinery.schematic import (
    VIRTIO_PORT_PLACEHOLDER,
    ExtensionManifest,
    ExtensionService,
    overlay_directory,
    parse_manifest,
)

if TYPE_CHECKING:
    from .services import LogBuffer, Running, ServiceSpec

__all__ = [
    "MountedExtension",
    "Mounter",
    "check_image",
    "extension_services",
    "file_sha256",
    "find_virtio_port",
    "mount_extensions",
    "mount_overlays",
    "overlay_options",
    "plan_overlays",
    "schematic_record",
]

log = logging.getLogger(__name__)

#: Library directories inside an extension, searched before the root's.
LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib")
#: Where an extension service finds programs: the overlay directories first.
SERVICE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin"
#: The source the overlays are mounted from (what ``mountinfo`` shows).
OVERLAY_SOURCE = "basalt-ext"


@dataclass(frozen=True)
class MountedExtension:
    """One extension mounted at ``root`` (``/usr/lib/basalt/extensions/NAME``)."""

    manifest: ExtensionManifest
    root: Path
    device: str


class Mounter(Protocol):
    """mount(2) and the mount table, as :mod:`basalt.machined.sys.mount` has them (tests
    pass a fake)."""

    def mount(self, source: str, target: Path, fstype: str, flags: int, data: str) -> None: ...

    def is_mounted(self, target: Path) -> bool: ...


def schematic_record(root: Path = Path("/")) -> dict[str, Any]:
    """The image's schematic record (id, extensions, extraKernelArgs, sha256); {} when the
    image carries none (container mode, an image older than schematics)."""
    try:
        record: dict[str, Any] = json.loads((root / EXTENSIONS_DIR / SCHEMATIC_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def check_image(image: Path, record: Mapping[str, Any]) -> str | None:
    """Why the extension image ``image`` must not be mounted, or None.

    A record with a ``sha256`` table (images built since custom extensions) accounts for
    every image it shipped; so does a record listing extensions. An image it does not
    name is refused, and so is one whose sha256 differs from the recorded one. An image
    the record has no sha256 for (an older image) passes. Raises OSError when the image
    cannot be read.
    """
    digests = record.get("sha256")
    table = digests if isinstance(digests, dict) else {}
    listed = record.get("extensions")
    known = set(table)
    if isinstance(listed, list):
        known |= {name for name in listed if isinstance(name, str)}
    name = image.stem
    if (known or isinstance(digests, dict)) and name not in known:
        return (
            f"{image} is not one of the image's extensions "
            f"({', '.join(sorted(known)) or 'it records none'}); it was not built into this image"
        )
    expected = table.get(name)
    if not isinstance(expected, str):
        return None
    found = file_sha256(image)
    if found != expected:
        return (
            f"{image} changed since the image was built: expected sha256 {expected}, found {found}"
        )
    return None


def mount_extensions(root: Path = Path("/")) -> tuple[list[MountedExtension], list[str]]:
    """Mount every ``*.sqfs`` in :data:`EXTENSIONS_DIR` (idempotent), read its manifest,
    then mount the overlays of the files they provide (:func:`mount_overlays`).

    Returns (extensions in use, ``"NAME: reason"`` per extension skipped); a skipped
    extension does not stop the boot, and its services do not run.
    """
    from .sys import loop, mount

    directory = root / EXTENSIONS_DIR
    record = schematic_record(root)
    mounted: list[MountedExtension] = []
    failed: list[str] = []
    for image in sorted(directory.glob("*.sqfs")) if directory.is_dir() else []:
        target = directory / image.stem
        try:
            refusal = check_image(image, record)
            if refusal:
                failed.append(f"{image.stem}: {refusal}")
                continue
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
            failed.append(f"{image.stem}: {_reason(exc)}")
            continue
        mounted.append(MountedExtension(manifest, target, device))
    kept, refused = mount_overlays(mounted, root)
    failed += [f"{name}: {reason}" for name, reason in sorted(refused.items())]
    return kept, failed


def _reason(exc: Exception) -> str:
    """An error as one line (a manifest's problems come one per line)."""
    text = exc.one_line() if isinstance(exc, BasaltError) else str(exc)
    return " ".join(text.split())


# -- files at fixed root paths: one read-only overlay per directory --------------------


def plan_overlays(
    extensions: Sequence[MountedExtension], root: Path, mounted: Collection[str] = ()
) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Which overlays to mount for the files ``extensions`` provide, and which extensions
    to refuse. Reads the trees; mounts nothing.

    Returns ({directory: its lower directories, top first}, {name: why refused}). The
    extensions are taken in name order, and the root's own directory comes last. An
    extension is refused, with every reason, when a path it provides is missing from its
    tree, when one of its overlay directories holds a file its manifest does not provide
    (the overlay shows the whole directory, so every file must be accounted for; an
    empty directory may stay unless it would hide a file), when the root or an earlier
    extension has the path (or a file where the path needs a directory), or when the
    root lacks the directory. ``mounted`` names
    directories whose overlay is already up: their root side was checked when it was
    mounted and is hidden now.
    """
    claimed: dict[str, str] = {}  # provided path (no leading '/') -> extension
    claimed_dirs: dict[str, str] = {}  # a directory nothing is provided below -> extension
    root_trees: dict[str, dict[str, bool] | None] = {}
    accepted: list[MountedExtension] = []
    refused: dict[str, str] = {}
    for extension in sorted(extensions, key=lambda e: e.manifest.name):
        manifest = extension.manifest
        provided = [path.lstrip("/") for path in manifest.provides]
        problems, spare_dirs = _tree_problems(
            extension.root, provided, manifest.overlay_directories()
        )
        for path in provided:
            directory = overlay_directory(path) or ""
            if directory not in root_trees:
                root_trees[directory] = _root_tree(root, directory, mounted)
            root_tree = root_trees[directory]
            if root_tree is None:
                problems.append(f"the image's root has no /{directory} to show /{path} in")
            elif _shadows(path, root_tree):
                problems.append(f"/{path} is in the image's root")
            owner = _claimed_by(path, claimed)
            if owner:
                problems.append(f"/{path} is also provided by extension {owner}")
            elif path in claimed_dirs:
                problems.append(f"/{path} is a directory in extension {claimed_dirs[path]}")
        for spare in spare_dirs:
            root_tree = root_trees.get(overlay_directory(spare) or "") or {}
            if _shadows(spare, root_tree, directory=True):
                problems.append(f"/{spare}, a directory in the extension, is a file in the root")
        if problems:
            refused[manifest.name] = "; ".join(problems)
            continue
        accepted.append(extension)
        claimed.update(dict.fromkeys(provided, manifest.name))
        claimed_dirs.update(dict.fromkeys(spare_dirs, manifest.name))
    overlays: dict[str, list[Path]] = {}
    for extension in accepted:
        for directory in extension.manifest.overlay_directories():
            overlays.setdefault(directory, []).append(extension.root / directory)
    for directory, lowers in overlays.items():
        lowers.append(root / directory)
    return overlays, refused


def _tree(base: Path, directory: str, *, ancestors_real: bool = True) -> dict[str, bool] | None:
    """Every entry below ``base/directory`` (relative to ``base``) -> whether it is a real
    directory; None when ``directory`` is not a directory there (or, with
    ``ancestors_real``, is reached through a symbolic link). Links are not followed."""
    parts = directory.split("/")
    if not (base / directory).is_dir():
        return None
    steps = (base.joinpath(*parts[:n]) for n in range(1, len(parts) + 1))
    if ancestors_real and any(step.is_symlink() for step in steps):
        return None
    entries: dict[str, bool] = {}
    pending = [directory]
    while pending:
        current = pending.pop()
        with os.scandir(base / current) as scan:
            for entry in scan:
                relative = f"{current}/{entry.name}"
                is_dir = entry.is_dir(follow_symlinks=False)
                entries[relative] = is_dir
                if is_dir:
                    pending.append(relative)
    return entries


def _root_tree(root: Path, directory: str, mounted: Collection[str]) -> dict[str, bool] | None:
    """The entries of the root's ``directory`` ({} under an overlay already up: the root's
    side was checked when it was mounted); None when it has no such directory."""
    if directory in mounted:
        return {}
    try:
        return _tree(root, directory, ancestors_real=False)
    except OSError:
        return None


def _tree_problems(
    base: Path, provided: list[str], directories: Iterable[str]
) -> tuple[list[str], list[str]]:
    """What is wrong with an extension's overlay directories (a provided path missing, a
    file not provided, a directory on a provided path that is not a real directory), and
    the directories in them that hold nothing provided (empty ones, which the builder
    allows)."""
    problems: list[str] = []
    entries: dict[str, bool] = {}
    for directory in directories:
        try:
            tree = _tree(base, directory)
        except OSError as exc:
            problems.append(f"cannot read /{directory} in the extension: {exc.strerror}")
            continue
        if tree is None:
            problems.append(f"/{directory} in the extension is not a plain directory")
            continue
        entries.update(tree)
    wanted = set(provided)
    needed_dirs = {a for path in provided for a in _ancestors(path)}
    spare_dirs: list[str] = []
    for path in provided:
        if path not in entries:
            problems.append(f"/{path} is not in the extension (its manifest provides it)")
    for entry, is_dir in sorted(entries.items()):
        if entry in wanted or any(a in wanted for a in _ancestors(entry)):
            continue
        if entry in needed_dirs:
            if not is_dir:
                problems.append(f"/{entry} in the extension is not a directory")
        elif is_dir:
            spare_dirs.append(entry)
        else:
            problems.append(f"/{entry} is in the extension but its manifest does not provide it")
    return problems, spare_dirs


def _ancestors(path: str) -> list[str]:
    """The directories between the overlay directory and ``path`` (both excluded)."""
    directory = overlay_directory(path)
    if directory is None:
        return []
    parts = path[len(directory) + 1 :].split("/")
    return [f"{directory}/{'/'.join(parts[:n])}" for n in range(1, len(parts))]


def _shadows(path: str, root_tree: Mapping[str, bool], *, directory: bool = False) -> bool:
    """Whether ``path`` would hide an entry of the root (a directory hides only a file),
    or sit below one of the root's files."""
    if path in root_tree and not (directory and root_tree[path]):
        return True
    return any(a in root_tree and not root_tree[a] for a in _ancestors(path))


def _claimed_by(path: str, claimed: Mapping[str, str]) -> str:
    """The extension that already provides ``path``, a file above it or a path below it."""
    if path in claimed:
        return claimed[path]
    for ancestor in _ancestors(path):
        if ancestor in claimed:
            return claimed[ancestor]
    below = path + "/"
    return next((owner for other, owner in claimed.items() if other.startswith(below)), "")


def overlay_options(lowers: Iterable[Path]) -> str:
    """overlayfs mount data with ``lowers`` as its lower directories (top first); ``:``,
    ``,`` and ``\\`` in a path are escaped with a backslash."""

    def escape(path: Path) -> str:
        return str(path).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")

    return "lowerdir=" + ":".join(escape(path) for path in lowers)


def mount_overlays(
    extensions: Sequence[MountedExtension], root: Path, mounter: Mounter | None = None
) -> tuple[list[MountedExtension], dict[str, str]]:
    """Mount the overlays :func:`plan_overlays` plans, each read-only on its directory of
    the root (an overlay already there is left alone).

    Returns (extensions in use, {name: why refused}); an overlay that fails to mount
    refuses the extensions in it, and the boot goes on.
    """
    from .sys import mount

    table: Mounter = mounter if mounter is not None else _SystemMounter()
    wanted = {d for extension in extensions for d in extension.manifest.overlay_directories()}
    up = {d for d in wanted if table.is_mounted(root / d)}
    overlays, refused = plan_overlays(extensions, root, up)
    for directory, lowers in sorted(overlays.items()):
        if directory in up:
            continue
        try:
            table.mount(
                OVERLAY_SOURCE,
                root / directory,
                "overlay",
                mount.MS_RDONLY | mount.MS_NODEV,
                overlay_options(lowers),
            )
        except (OSError, BasaltError) as exc:
            reason = f"the overlay on /{directory} failed: {_reason(exc)}"
            for extension in extensions:
                if directory in extension.manifest.overlay_directories():
                    refused.setdefault(extension.manifest.name, reason)
            continue
        names = [e.manifest.name for e in extensions if e.root / directory in lowers]
        log.info("/%s shows the files of extensions %s", directory, ", ".join(names))
    kept = [e for e in extensions if e.manifest.name not in refused]
    return kept, refused


class _SystemMounter:
    """The machine's mount table (:mod:`basalt.machined.sys.mount`)."""

    def mount(self, source: str, target: Path, fstype: str, flags: int, data: str) -> None:
        from .sys import mount

        mount.mount(source, target, fstype, flags, data)

    def is_mounted(self, target: Path) -> bool:
        from .sys import mount

        return mount.is_mounted(target)


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
        """The service's own variables, then machined's (PATH, LANG, LD_LIBRARY_PATH),
        which win."""
        libraries = ":".join(str(self.extension.root / d) for d in LIBRARY_DIRS)
        return {
            **dict(self.service.environment),
            "PATH": SERVICE_PATH,
            "LANG": "C.UTF-8",
            "LD_LIBRARY_PATH": libraries,
        }

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
    owners: dict[str, str] = {}
    for extension in extensions:
        for service in extension.manifest.services:
            name = extension.manifest.name
            if service.name in owners:  # the image builder refuses this; an older one may not
                log.error(
                    "extension %s: service %s is also a service of extension %s; not started",
                    name,
                    service.name,
                    owners[service.name],
                )
                continue
            owners[service.name] = name
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


def mount_and_log(root: Path) -> tuple[list[MountedExtension], list[str]]:
    """:func:`mount_extensions`, with what it did on the log (for the platform): one line
    per extension mounted and per extension skipped."""
    mounted, skipped = mount_extensions(root)
    for extension in mounted:
        manifest = extension.manifest
        log.info(
            "extension %s %s mounted from %s (%d services)",
            manifest.name,
            manifest.version,
            extension.device,
            len(manifest.services),
        )
    for reason in skipped:
        log.error("extension %s (skipped: its files and services are not used)", reason)
    return mounted, skipped
