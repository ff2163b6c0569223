"""The image pipeline: lock -> fetch -> unpack -> rootfs -> squashfs, and boot assets.

``build`` wires the stages from the lock, runs them through the cache and copies the
results into an image directory with ``image.json``, which ``inspect`` reads back.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

import basalt
from basalt.machinery.elf import ElfFormatError, is_elf, read_elf
from basalt.machinery.images import INITRAMFS, KERNEL, ROOTFS, create_bundle, key_id
from basalt.machinery.schematic import EMPTY, Schematic

from . import lock as lockfile
from .boot import Boot
from .custom import ExtensionSources
from .disk import DISK_FILES, Disk
from .errors import ImageError
from .extensions import CustomExtension, Extension, extension_stages, schematic_json
from .packages import FetchDebs, FetchWheels, Unpack
from .rootfs import BasaltSources, Rootfs, check_imager_unchanged, source_digest
from .squashfs import SOURCE_DATE_EPOCH, Squashfs
from .stage import Cache, sha256_file, walk_sorted

DEFAULT_OUT = lockfile.REPO_ROOT / "_out" / "image"
DEFAULT_CACHE = lockfile.REPO_ROOT / "_out" / "cache"
#: Modules that reach the root: loaded by the initramfs.
INITRD_MODULES = ("virtio_rng", "virtio_mmio", "virtio_pci", "virtio_blk", "squashfs")
#: Modules the node itself needs once the root is mounted: listed by name in the root
#: (basalt.machined.platform.metal.IMAGE_MODULES) and loaded by machined as PID 1.
#: AF_PACKET, which its DHCP client needs, is built into the Debian cloud kernel. loop
#: mounts the system extensions; virtio_console gives qemu-ga its virtio-serial port;
#: overlay backs containerd's overlayfs snapshotter. vfat (with fat) and the code pages
#: its names use mount the ESP, and efivarfs reads systemd-boot's variables, for A/B
#: upgrades (basalt/machinery/boot/esp.py).
ROOT_MODULES = (
    "virtio_net",
    "loop",
    "virtio_console",
    "overlay",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "efivarfs",
)
#: Kernel arguments of every boot (microvm needs the TSC ones under TCG).
#: ``cryptomgr.notests``: the kernel skips the self-tests of its crypto algorithms (its
#: two slowest initcalls under TCG; with ``fips=1`` the kernel runs them anyway; ADR 0025).
CMDLINE = "console=ttyS0 quiet panic=-1 cryptomgr.notests tsc_early_khz=2000000 no_timer_check"
IMAGE_FILES = ("vmlinuz", "initrd.img", "root.sqfs", *DISK_FILES)
#: The signed upgrade bundle (docs/adr/0007), written when a signing key is given.
BUNDLE = "bundle.tar"
#: Bundle payload name -> the image file it is.
BUNDLE_PAYLOAD = {KERNEL: "vmlinuz", INITRAMFS: "initrd.img", ROOTFS: "root.sqfs"}
#: Debian architecture (the kernel package's suffix) -> bundle architecture.
_ARCHITECTURES = {"amd64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True)
class Pipeline:
    """The stages of one image, wired from a lock."""

    rootfs: Rootfs
    squashfs: Squashfs
    boot: Boot
    lock: lockfile.Lock
    schematic: Schematic = EMPTY
    extensions: tuple[Extension | CustomExtension, ...] = ()
    #: The UEFI disk image (disk.raw, disk.qcow2); see basalt/imager/disk.py.
    disk: Disk | None = None

    @classmethod
    def from_lock(
        cls,
        lock: lockfile.Lock,
        schematic: Schematic = EMPTY,
        sources: ExtensionSources | None = None,
    ) -> Pipeline:
        """The stages of ``schematic``'s image; its custom extensions are found and
        verified through ``sources`` (an error names each one that cannot be used)."""
        check_imager_unchanged()
        release = lock.kernel.removeprefix("linux-image-")
        unpack = Unpack(debs=FetchDebs(debs=lock.debs))
        rootfs = Rootfs(
            unpack=unpack,
            wheels=FetchWheels(wheels=lock.wheels),
            sources=BasaltSources(digest=source_digest()),
            basalt_version=basalt.__version__,
            kernel_release=release,
            modules=(*INITRD_MODULES, *ROOT_MODULES),
            root_modules=ROOT_MODULES,
        )
        extensions: tuple[Extension | CustomExtension, ...] = extension_stages(
            schematic, lock, unpack, rootfs
        )
        extensions += custom_stages(schematic, sources, {e.extension_name for e in extensions})
        boot = Boot(
            unpack=unpack,
            rootfs=rootfs,
            kernel_release=release,
            modules=INITRD_MODULES,
            extensions=extensions,
            schematic=schematic_json(schematic),
        )
        squashfs = Squashfs(rootfs=rootfs)
        disk = Disk(
            boot=boot,
            squashfs=squashfs,
            unpack=unpack,
            basalt_version=basalt.__version__,
            cmdline=" ".join((CMDLINE, *schematic.extra_kernel_args)),
        )
        return cls(rootfs, squashfs, boot, lock, schematic, extensions, disk)


def custom_stages(
    schematic: Schematic, sources: ExtensionSources | None, official: set[str]
) -> tuple[CustomExtension, ...]:
    """The :class:`CustomExtension` stage of each custom extension ``schematic`` pins."""
    if not schematic.custom_extensions:
        return ()
    resolved = (sources or ExtensionSources()).resolve(schematic)
    clash = sorted(official & {r.info.name for r in resolved})
    if clash:
        raise ImageError(
            f"custom extension {', '.join(clash)} has the name of an official extension",
            hint="rename the custom extension (its manifest's name) and rebuild it",
        )
    return tuple(
        CustomExtension(r.info.name, r.ref.sha256, str(r.path))
        for r in sorted(resolved, key=lambda r: r.info.name)
    )


def check_fixed_paths(cache: Cache, pipeline: Pipeline) -> None:
    """Refuse the image when two extensions, or an extension and the root, provide the
    same fixed path, or two extensions a service of the same name (the node would
    refuse the second one at boot)."""
    root = cache.output(pipeline.rootfs) / "root"
    described = []
    for stage in pipeline.extensions:
        data = json.loads((cache.output(stage) / "extension.json").read_text())
        if isinstance(stage, Extension):  # an official one: its services are in its recipe
            data["services"] = [service.name for service in stage.recipe.services]
        described.append(data)
    problems = fixed_path_conflicts(root, described) + service_conflicts(described)
    if problems:
        raise ImageError(
            "extensions collide:\n" + "\n".join(f"  {p}" for p in problems),
            hint="drop one of the extensions from the schematic, or rebuild it without the "
            "path or under another service name",
        )


def service_conflicts(extensions: list[dict[str, Any]]) -> list[str]:
    """One line per service of ``extensions`` (their extension.json, with ``services``)
    whose name an earlier extension's service already has."""
    owners: dict[str, str] = {}
    problems = []
    for described in extensions:
        for service in described.get("services", []):
            if service in owners:
                problems.append(
                    f"{described['name']}: service {service} is also a service of {owners[service]}"
                )
            else:
                owners[service] = described["name"]
    return problems


def fixed_path_conflicts(root: Path, extensions: list[dict[str, Any]]) -> list[str]:
    """One line per fixed path (``provides``) of ``extensions`` (their extension.json)
    that the root tree ``root`` or an earlier extension already has."""
    owners: dict[str, str] = {}
    problems = []
    for described in extensions:
        for path in described.get("provides", []):
            in_root = root / path.lstrip("/")
            if in_root.exists() or in_root.is_symlink():
                problems.append(f"{described['name']}: {path} is in the image's root")
            elif path in owners:
                problems.append(f"{described['name']}: {path} is also provided by {owners[path]}")
            else:
                owners[path] = described["name"]
    return problems


def executables(root: Path) -> list[str]:
    """Files in ``root`` that can be run: an execute bit and either a program's ELF
    header (an interpreter and no soname, or static) or a ``#!`` line."""
    found = []
    for path in walk_sorted(root):
        if path.is_symlink() or not path.is_file() or not path.stat().st_mode & 0o111:
            continue
        if is_elf(path):
            try:
                program = read_elf(path).is_program
            except ElfFormatError:
                program = False
        else:
            with path.open("rb") as stream:
                program = stream.read(2) == b"#!"
        if program:
            found.append("/" + str(path.relative_to(root)))
    return found


def _tree_size(root: Path) -> tuple[int, int]:
    files = size = 0
    for path in walk_sorted(root):
        if path.is_file() and not path.is_symlink():
            files += 1
            size += path.stat().st_size
    return files, size


def build(
    out: Path = DEFAULT_OUT,
    cache_dir: Path = DEFAULT_CACHE,
    lock_path: Path = lockfile.DEFAULT_LOCK,
    pipeline: Pipeline | None = None,
    schematic: Schematic = EMPTY,
    signing_key: Path | None = None,
    extension_sources: ExtensionSources | None = None,
) -> dict[str, Any]:
    """Build (or reuse) every stage and write the image directory ``out``.

    ``pipeline`` defaults to the one wired from the lock at ``lock_path`` (checked first)
    and ``schematic`` (its extensions and kernel arguments; none by default). With
    ``signing_key`` (a ``basaltctl gen signing-key`` .key file, read before any build
    work) the image also gets ``bundle.tar``: the signed upgrade bundle of its kernel,
    initramfs and root. Without one, a bundle left by an earlier build is removed.
    ``extension_sources`` finds and verifies the schematic's custom extensions.
    """
    key = read_signing_key(signing_key) if signing_key is not None else None
    if pipeline is None:
        lock = lockfile.read(lock_path)
        lockfile.check(lock, lock_path)
        pipeline = Pipeline.from_lock(lock, schematic, extension_sources)
    lock = pipeline.lock
    cache = Cache(cache_dir)
    rootfs_dir = cache.output(pipeline.rootfs)
    check_fixed_paths(cache, pipeline)
    squashfs_dir = cache.output(pipeline.squashfs)
    boot_dir = cache.output(pipeline.boot)
    out.mkdir(parents=True, exist_ok=True)
    sources = {
        "vmlinuz": boot_dir / "vmlinuz",
        "initrd.img": boot_dir / "initrd.img",
        "root.sqfs": squashfs_dir / "root.sqfs",
    }
    if pipeline.disk is not None:
        disk_dir = cache.output(pipeline.disk)
        sources.update({name: disk_dir / name for name in DISK_FILES})
    for name, source in sources.items():
        target = out / name
        if target.exists():
            target.unlink()
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    bundle = None
    if key is not None:
        bundle = write_bundle(out, pipeline, key)
        sources[BUNDLE] = out / BUNDLE
    else:
        (out / BUNDLE).unlink(missing_ok=True)
    root = rootfs_dir / "root"
    files, tree_bytes = _tree_size(root)
    programs = executables(root)
    rootfs_manifest = json.loads((rootfs_dir / "manifest.json").read_text())
    manifest: dict[str, Any] = {
        "name": "basalt",
        "version": basalt.__version__,
        "kernel": {"package": lock.kernel, "release": pipeline.boot.kernel_release},
        "cmdline": " ".join((CMDLINE, *pipeline.schematic.extra_kernel_args)),
        "schematic": pipeline.schematic.record(),
        "extensions": [_extension(cache, stage) for stage in pipeline.extensions],
        "files": {
            name: _describe(out / name) for name in (*IMAGE_FILES, BUNDLE) if name in sources
        },
        "bundle": bundle,
        "root": {"files": files, "bytes": tree_bytes, "compression": pipeline.squashfs.compression},
        "executables": programs,
        "packages": {d.name: d.version for d in lock.debs},
        "wheels": {w.name: w.version for w in lock.wheels},
        "dropped_stdlib_extensions": rootfs_manifest["dropped_stdlib_extensions"],
        "kernel_modules": rootfs_manifest["modules"],
        "stages": {
            stage.name: stage.stage_id()
            for stage in (pipeline.rootfs, pipeline.squashfs, pipeline.boot, *pipeline.extensions)
            + ((pipeline.disk,) if pipeline.disk is not None else ())
        },
    }
    (out / "image.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    manifest["build"] = [
        {"stage": name, "result": result, "seconds": round(seconds, 1)}
        for name, result, seconds in cache.built
    ]
    return manifest


def read_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    from basalt.machinery.images import load_signing_key

    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ImageError(
            f"signing key {path}: {exc.strerror}",
            hint="make one with 'basaltctl gen signing-key -o PREFIX' and pass PREFIX.key",
        ) from None
    return load_signing_key(text, str(path))


def bundle_architecture(kernel_package: str) -> str:
    """``x86_64`` for ``linux-image-6.1.0-27-cloud-amd64``: the bundle's architecture."""
    for debian, arch in _ARCHITECTURES.items():
        if kernel_package.endswith(f"-{debian}"):
            return arch
    raise ImageError(
        f"kernel package {kernel_package!r} names no known architecture "
        f"({', '.join(_ARCHITECTURES)})",
        hint="image.lock's kernel must be an amd64 or arm64 Debian kernel",
    )


def write_bundle(out: Path, pipeline: Pipeline, key: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    """Sign ``out``'s kernel, initramfs and root into ``out/bundle.tar``; describe it.

    Created at SOURCE_DATE_EPOCH, like every other image file: the same image and key
    give the same bytes.
    """
    created = dt.datetime.fromtimestamp(SOURCE_DATE_EPOCH, dt.UTC)
    manifest = create_bundle(
        out / BUNDLE,
        {name: out / source for name, source in BUNDLE_PAYLOAD.items()},
        basalt.__version__,
        pipeline.schematic.id,
        bundle_architecture(pipeline.lock.kernel),
        key,
        created=created,
        tar=True,
        overwrite=True,
        platform="metal",
    )
    return {
        "version": manifest.version,
        "schematicId": manifest.schematic_id,
        "architecture": manifest.architecture,
        "keyId": key_id(key),
        "payload": {f.path: f.sha256 for f in manifest.files},
    }


def _extension(cache: Cache, stage: Extension | CustomExtension) -> dict[str, Any]:
    """An extension as image.json records it: name, version, size, its executables."""
    built = cache.output(stage)
    described: dict[str, Any] = json.loads((built / "extension.json").read_text())
    described["executables"] = executables(built / "tree")
    return described


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def inspect(image_dir: Path, verify: bool = True) -> dict[str, Any]:
    """``image.json`` of ``image_dir``, after checking its files against their sha256."""
    manifest_path = image_dir / "image.json"
    if not manifest_path.exists():
        raise ImageError(
            f"{image_dir} is not a Basalt image directory (no image.json)",
            hint="build one with 'basaltctl image build --out DIR'",
        )
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    if verify:
        for name, described in manifest["files"].items():
            path = image_dir / name
            if not path.exists() or sha256_file(path) != described["sha256"]:
                raise ImageError(
                    f"{path}: missing or not the file image.json describes",
                    hint="rebuild the image",
                )
    return manifest
