"""Custom system extensions: build one from a source, sign it, verify it, find it.

A *source* is a directory (or an OCI image layout on disk whose layers unpack to one)
holding ``manifest.yaml`` and ``rootfs/``, the extension's files at their paths::

    manifest.yaml             name, version, description, services, provides
    rootfs/usr/local/bin/kubelet
    rootfs/usr/bin/hello
    rootfs/usr/lib/x86_64-linux-gnu/libhello.so.1

:func:`build_extension` checks the whole source and reports every problem with its
path (manifest fields, commands and fixed-path files that are missing, names that
escape the tree, special files, libraries that neither the image's root nor the
extension has, fixed paths the root already has), then writes a reproducible squashfs
(the root's mksquashfs flags) with the manifest as the node will read it back, and signs
it. A signed extension file is the squashfs followed by a trailer::

    squashfs bytes | payload JSON | u32 big-endian payload length | b"BSLTEXT1"

The payload is canonical JSON: format, name, version, the squashfs's length and sha256,
the signing key's id and the Ed25519 signature over the same JSON without the
signature. The kernel reads a squashfs up to its own ``bytes_used`` and ignores the
rest, so the node loop-mounts the file as it is. An extension's *content id* is the
sha256 of the whole file: what the build prints, what a schematic pins
(``customExtensions: [{path, sha256}]``) and what the node checks at boot.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import struct
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from basalt.machinery.elf import ElfFormatError, read_elf
from basalt.machinery.errors import BasaltError, ConfigSyntaxError, Problem
from basalt.machinery.image_layout import OVERLAY_DIRECTORIES
from basalt.machinery.images import VerificationKey, key_id
from basalt.machinery.images.manifest import canonical_json
from basalt.machinery.schematic import (
    CustomExtensionRef,
    ExtensionManifest,
    ManifestError,
    Schematic,
    SchematicError,
    parse_manifest,
)

from . import libs
from .errors import ImageBuildError
from .squashfs import SOURCE_DATE_EPOCH, make_squashfs
from .stage import sha256_file, walk_sorted

__all__ = [
    "ExtensionSourceError",
    "ExtensionSources",
    "ResolvedExtension",
    "SignedInfo",
    "build_extension",
    "check_source",
    "read_signed",
    "verify_extension",
]

MAGIC = b"BSLTEXT1"
FORMAT = "basalt-extension/v1"
_TRAILER = struct.Struct(">I")
#: A payload is a few hundred bytes; anything much larger is not ours.
_MAX_PAYLOAD = 16 * 1024
#: Where an extension's own libraries live (machined's LD_LIBRARY_PATH for its services).
EXTENSION_LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib")


class ExtensionFileError(ImageBuildError):
    """A signed extension file is unsigned, damaged, changed or signed by an unknown key."""


class ExtensionSourceError(SchematicError):
    """An extension source has problems; ``problems`` lists each with its path."""


@dataclass(frozen=True)
class SignedInfo:
    """What a signed extension file's trailer says, after it was checked."""

    name: str
    version: str
    #: sha256 of the whole file: the extension's content id.
    sha256: str
    key_id: str
    squashfs_bytes: int
    squashfs_sha256: str

    def to_data(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "keyId": self.key_id,
            "squashfsBytes": self.squashfs_bytes,
        }


# -- the signed file ------------------------------------------------------------------------------


def sign_squashfs(
    squashfs: Path, out: Path, key: ed25519.Ed25519PrivateKey, manifest: ExtensionManifest
) -> SignedInfo:
    """Write ``out``: ``squashfs`` followed by its signed trailer. Deterministic."""
    size = squashfs.stat().st_size
    unsigned = {
        "format": FORMAT,
        "name": manifest.name,
        "version": manifest.version,
        "bytes": size,
        "sha256": sha256_file(squashfs),
        "keyId": key_id(key),
    }
    payload = canonical_json({**unsigned, "signature": key.sign(canonical_json(unsigned)).hex()})
    partial = out.with_name(f".{out.name}.partial")
    with squashfs.open("rb") as source, partial.open("wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)
        target.write(payload + _TRAILER.pack(len(payload)) + MAGIC)
    os.chmod(partial, 0o644)
    partial.replace(out)
    return read_signed(out)


def read_signed(path: Path) -> SignedInfo:
    """The trailer of the signed extension file ``path``, checked against the file's
    bytes (length, sha256) but not against any key: see :func:`verify_extension`."""
    info, _, _ = _read(path)
    return info


def _read(path: Path) -> tuple[SignedInfo, bytes, bytes]:
    def refuse(what: str, hint: str = "") -> ExtensionFileError:
        return ExtensionFileError(
            f"{path}: {what}",
            hint=hint
            or "build it with 'basaltctl extension build DIR -o NAME.sqfs --signing-key KEY'",
        )

    try:
        with path.open("rb") as stream:
            total = os.fstat(stream.fileno()).st_size
            tail = 4 + len(MAGIC)
            if total < tail:
                raise refuse("not a signed Basalt extension (too short)")
            stream.seek(total - tail)
            length_bytes = stream.read(4)
            if stream.read(len(MAGIC)) != MAGIC:
                raise refuse("not a signed Basalt extension (no signature trailer: unsigned?)")
            (length,) = _TRAILER.unpack(length_bytes)
            if length > _MAX_PAYLOAD or length > total - tail:
                raise refuse("damaged signature trailer (impossible length)")
            stream.seek(total - tail - length)
            payload = stream.read(length)
            digest = hashlib.sha256()
            whole = hashlib.sha256()
            stream.seek(0)
            remaining = total - tail - length
            squashfs_bytes = remaining
            while remaining:
                block = stream.read(min(remaining, 1 << 20))
                if not block:
                    break
                remaining -= len(block)
                digest.update(block)
                whole.update(block)
            whole.update(payload + length_bytes + MAGIC)
    except OSError as exc:
        raise ExtensionFileError(
            f"cannot read extension {path}: {exc.strerror or exc}",
            hint="check the path (relative paths are relative to the schematic's directory)",
        ) from None
    try:
        data = json.loads(payload)
    except ValueError:
        raise refuse("damaged signature trailer (not JSON)") from None
    wanted = {"format", "name", "version", "bytes", "sha256", "keyId", "signature"}
    if not isinstance(data, dict) or set(data) != wanted or data.get("format") != FORMAT:
        raise refuse(f"signature trailer is not {FORMAT}")
    if not all(isinstance(data[k], str) for k in wanted - {"bytes"}):
        raise refuse("damaged signature trailer (field types)")
    if data["bytes"] != squashfs_bytes:
        raise refuse(
            f"the squashfs is {squashfs_bytes} bytes, its signature says {data['bytes']}: "
            "the file was changed or truncated",
            hint="rebuild or re-download the extension",
        )
    if data["sha256"] != digest.hexdigest():
        raise refuse(
            "the squashfs does not match its signature's sha256: the file was changed",
            hint="rebuild or re-download the extension",
        )
    try:
        signature = bytes.fromhex(data["signature"])
    except ValueError:
        raise refuse("damaged signature trailer (signature is not hex)") from None
    unsigned = canonical_json({k: v for k, v in data.items() if k != "signature"})
    info = SignedInfo(
        name=data["name"],
        version=data["version"],
        sha256=whole.hexdigest(),
        key_id=data["keyId"],
        squashfs_bytes=squashfs_bytes,
        squashfs_sha256=data["sha256"],
    )
    return info, unsigned, signature


def verify_extension(path: Path, trusted: Iterable[VerificationKey]) -> SignedInfo:
    """Check ``path``'s trailer, bytes and signature against the ``trusted`` keys."""
    info, unsigned, signature = _read(path)
    keys = {k.key_id: k for k in trusted}
    key = keys.get(info.key_id)
    if key is None:
        raise ExtensionFileError(
            f"{path}: extension {info.name} {info.version} is signed by key "
            f"{info.key_id[:16]}…, which is not trusted here",
            hint="pass its public key with --extension-key PUB.pem"
            if keys
            else "pass the public key it was signed with: --extension-key PUB.pem",
        )
    try:
        key.public_key.verify(signature, unsigned)
    except InvalidSignature:
        raise ExtensionFileError(
            f"{path}: the signature of extension {info.name} does not verify with key "
            f"{info.key_id[:16]}…: the file was changed after signing",
            hint="rebuild or re-download the extension",
        ) from None
    return info


# -- finding the extensions a schematic names ----------------------------------------------------


@dataclass(frozen=True)
class ResolvedExtension:
    """A schematic's custom extension, found and verified."""

    ref: CustomExtensionRef
    path: Path
    info: SignedInfo


@dataclass(frozen=True)
class ExtensionSources:
    """Where a build finds custom extensions and which keys it trusts.

    A reference with a ``path`` is read from there (relative to ``base``, the schematic's
    directory); one without is looked up as ``<sha256>.sqfs`` in the ``search``
    directories (a factory's registry)."""

    search: tuple[Path, ...] = ()
    trusted: tuple[VerificationKey, ...] = ()
    base: Path | None = None

    def locate(self, ref: CustomExtensionRef) -> Path | None:
        if ref.path:
            path = Path(ref.path)
            return path if path.is_absolute() or self.base is None else self.base / path
        for directory in self.search:
            candidate = directory / f"{ref.sha256}.sqfs"
            if candidate.is_file():
                return candidate
        return None

    def resolve(self, schematic: Schematic) -> list[ResolvedExtension]:
        """Every custom extension of ``schematic``, found, pinned and verified; one error
        listing every one that is not."""
        found: list[ResolvedExtension] = []
        problems: list[str] = []
        names: dict[str, str] = {}
        for ref in schematic.custom_extensions:
            label = ref.path or f"sha256 {ref.sha256[:16]}…"
            path = self.locate(ref)
            if path is None:
                problems.append(f"{label}: no such extension in {self._where()}")
                continue
            try:
                actual = sha256_file(path)
            except OSError as exc:
                problems.append(f"{label}: cannot read {path}: {exc.strerror or exc}")
                continue
            if actual != ref.sha256:
                problems.append(
                    f"{label}: the file's sha256 is {actual}, the schematic pins {ref.sha256}"
                    " (a different or changed file)"
                )
                continue
            try:
                info = verify_extension(path, self.trusted)
            except ExtensionFileError as exc:
                problems.append(f"{exc.message} ({exc.hint})" if exc.hint else exc.message)
                continue
            if info.name in names:
                problems.append(
                    f"{label}: a second extension named {info.name!r} (also {names[info.name]})"
                )
                continue
            names[info.name] = label
            found.append(ResolvedExtension(ref, path, info))
        if problems:
            raise ImageBuildError(
                "custom extensions cannot be used:\n" + "\n".join(f"  {p}" for p in problems),
                hint="build extensions with 'basaltctl extension build', pin the sha256 it "
                "prints, and trust its key with --extension-key",
            )
        return found

    def _where(self) -> str:
        if not self.search:
            return "no registry (give the extension a path)"
        return ", ".join(str(d) for d in self.search)


# -- sources --------------------------------------------------------------------------------------


@dataclass
class _Checks:
    source: str
    problems: list[Problem] = field(default_factory=list)

    def add(self, where: str, message: str, hint: str | None = None) -> None:
        self.problems.append(Problem("extension", where, message, hint=hint, source=self.source))


def unpack_source(source: Path, work: Path) -> Path:
    """The source directory of ``source``: itself, or an OCI image layout's layers
    unpacked into ``work``."""
    if not source.exists():
        raise BasaltError(
            f"extension source {source} does not exist",
            hint="pass a directory with manifest.yaml and rootfs/, or an OCI image layout",
        )
    if (source / "oci-layout").is_file():
        return _unpack_oci(source, work / "oci")
    if not source.is_dir():
        raise BasaltError(
            f"extension source {source} is not a directory",
            hint="pass a directory with manifest.yaml and rootfs/, or an OCI image layout",
        )
    return source


def _blob(layout: Path, descriptor: Any, what: str) -> Path:
    digest = descriptor.get("digest", "") if isinstance(descriptor, dict) else ""
    algorithm, _, hexdigest = str(digest).partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64 or not hexdigest.isalnum():
        raise BasaltError(f"{layout}: {what} has no sha256 digest", hint="a valid OCI layout")
    path = layout / "blobs" / "sha256" / hexdigest
    if not path.is_file() or sha256_file(path) != hexdigest:
        raise BasaltError(
            f"{layout}: blob {digest} ({what}) is missing or does not match its digest",
            hint="re-export the image (e.g. 'skopeo copy ... oci:DIR')",
        )
    return path


def _unpack_oci(layout: Path, target: Path) -> Path:
    def json_of(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BasaltError(
                f"{path}: not readable JSON ({exc})", hint="a valid OCI layout"
            ) from None

    index = json_of(layout / "index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or len(manifests) != 1:
        raise BasaltError(
            f"{layout}/index.json: expected exactly one manifest, found "
            f"{len(manifests) if isinstance(manifests, list) else 'none'}",
            hint="export a single-platform image",
        )
    manifest = json_of(_blob(layout, manifests[0], "the image manifest"))
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list) or not layers:
        raise BasaltError(f"{layout}: the image manifest has no layers", hint="a valid OCI layout")
    target.mkdir(parents=True)
    for number, layer in enumerate(layers):
        media = str(layer.get("mediaType", "")) if isinstance(layer, dict) else ""
        blob = _blob(layout, layer, f"layer {number}")
        if media.endswith("+zstd"):
            raise BasaltError(
                f"{layout}: layer {number} is zstd-compressed, which this build does not read",
                hint="export the image with gzip or uncompressed layers",
            )
        opener = gzip.open if media.endswith(("+gzip", ".gzip")) else open
        with opener(blob, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as archive:
            for member in archive:
                _extract_member(archive, member, target, f"{layout} layer {number}")
    return target


def _extract_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path, where: str
) -> None:
    name = member.name
    while name.startswith("./"):  # 'tar -C DIR .' writes ./NAME; keep NAME's own dots
        name = name[2:]
    parts = Path(name).parts
    if member.name.startswith("/") or ".." in parts:
        raise BasaltError(
            f"{where}: entry {member.name!r} escapes the image (absolute or '..')",
            hint="an extension's files must stay inside it; rebuild the image",
        )
    if any(part.startswith(".wh.") for part in parts):
        raise BasaltError(
            f"{where}: entry {member.name!r} is a whiteout (deletes a lower layer's file)",
            hint="squash the image into layers that only add files",
        )
    if not name or name == ".":
        return
    destination = target / name
    inside, parent = os.path.realpath(target), os.path.realpath(destination.parent)
    if parent != inside and not parent.startswith(inside + os.sep):
        raise BasaltError(
            f"{where}: entry {member.name!r} is below a symlink that leads out of the image",
            hint="an extension's files must stay inside it; rebuild the image",
        )
    if destination.is_symlink() and not member.isdir():
        destination.unlink()  # replaced, never written through
    if member.isdir():
        destination.mkdir(parents=True, exist_ok=True)
    elif member.isfile():
        destination.parent.mkdir(parents=True, exist_ok=True)
        extracted = archive.extractfile(member)
        assert extracted is not None
        with destination.open("wb") as out:
            shutil.copyfileobj(extracted, out)
        os.chmod(destination, 0o755 if member.mode & 0o111 else 0o644)
    elif member.issym():
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.exists() or destination.is_symlink():
            destination.unlink()
        os.symlink(member.linkname, destination)
    else:
        raise BasaltError(
            f"{where}: entry {member.name!r} is a "
            + ("hard link" if member.islnk() else "device or special file"),
            hint="an extension holds regular files, directories and symlinks only",
        )


def _manifest_of(source: Path, checks: _Checks) -> ExtensionManifest | None:
    path = source / "manifest.yaml"
    try:
        text = path.read_text()
    except FileNotFoundError:
        checks.add("manifest.yaml", "is missing", hint="see docs/extensions.md for its fields")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        checks.add("manifest.yaml", f"cannot be read: {exc}")
        return None
    try:
        return parse_manifest(text, source=str(path))
    except ManifestError as exc:
        checks.problems.extend(exc.problems)
    except ConfigSyntaxError as exc:
        checks.add("manifest.yaml", exc.render())
    return None


def _files(tree: Path) -> Iterator[Path]:
    yield from walk_sorted(tree)


def check_source(source: Path, root: Path) -> tuple[ExtensionManifest, Path]:
    """Check the source directory ``source`` against the image root tree ``root``;
    return its manifest and its ``rootfs`` directory, or raise
    :class:`ExtensionSourceError` listing every problem."""
    checks = _Checks(str(source))
    manifest = _manifest_of(source, checks)
    tree = source / "rootfs"
    if not tree.is_dir() or tree.is_symlink():
        checks.add("rootfs", "is missing: the extension's files go in rootfs/ at their paths")
        raise ExtensionSourceError(checks.problems, source=str(source), kind="extension source")
    special = False
    for path in _files(tree):
        relative = path.relative_to(tree)
        where = f"rootfs/{relative}"
        name = path.name
        if not name.isprintable() or "\n" in name:
            checks.add(where, "file name has control characters")
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            target = os.readlink(path)
            landing = os.path.normpath(os.path.join(os.path.dirname(relative), target))
            if not os.path.isabs(target) and (landing == ".." or landing.startswith("../")):
                checks.add(
                    where,
                    f"symlink to {target!r} leaves the extension ('..' traversal)",
                    hint="point it inside rootfs/ or at an absolute path on the node",
                )
        elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            checks.add(where, "is a device, pipe or socket", hint="extensions hold files only")
            special = True
        elif mode & (stat.S_ISUID | stat.S_ISGID):
            checks.add(where, "is setuid or setgid", hint="remove the bit (chmod u-s,g-s)")
    if manifest is not None:
        _check_manifest_files(manifest, tree, root, checks)
        if not special:  # reading a fifo for an ELF header would block the build
            _check_libraries(tree, root, checks)
    if checks.problems or manifest is None:
        raise ExtensionSourceError(checks.problems, source=str(source), kind="extension source")
    return manifest, tree


def _check_manifest_files(
    manifest: ExtensionManifest, tree: Path, root: Path, checks: _Checks
) -> None:
    for index, service in enumerate(manifest.services):
        program = tree / service.command.lstrip("/")
        where = f"manifest.yaml: services[{index}].command"
        if not program.is_file():
            checks.add(where, f"{service.command} is not in rootfs/ (rootfs{service.command})")
        elif not os.access(program, os.X_OK):
            checks.add(where, f"rootfs{service.command} is not executable", hint="chmod +x it")
    provided = set(manifest.provides)
    for index, path in enumerate(manifest.provides):
        where = f"manifest.yaml: provides[{index}]"
        inside = tree / path.lstrip("/")
        if not (inside.is_file() or inside.is_symlink()):
            checks.add(where, f"{path} is not in rootfs/ (put the file at rootfs{path})")
        in_root = root / path.lstrip("/")
        if in_root.exists() or in_root.is_symlink():
            checks.add(
                where,
                f"{path} collides with the image's root, which has that file",
                hint="an extension may add files at fixed paths, never replace the root's",
            )
    for directory in OVERLAY_DIRECTORIES:
        base = tree / directory
        if not base.is_dir():
            continue
        for entry in _files(base):
            fixed = "/" + str(entry.relative_to(tree))
            if not entry.is_dir() and fixed not in provided:
                checks.add(
                    f"rootfs{fixed}",
                    f"is below /{directory}, a fixed-path directory, but not in provides",
                    hint=f"list {fixed} in the manifest's provides",
                )


def _find_library(soname: str, tree: Path, root: Path, *, own: bool = True) -> bool:
    for directory in EXTENSION_LIBRARY_DIRS if own else ():
        if (tree / directory / soname).exists():
            return True
    return libs.find(root, soname) is not None


def _check_libraries(tree: Path, root: Path, checks: _Checks) -> None:
    """Every ELF's loader and libraries must be found. Files at fixed paths run outside
    the extension (the node's kubelet service starts /usr/local/bin/kubelet without the
    extension's LD_LIBRARY_PATH), so theirs must come from the image's root."""
    for path in libs.elf_files(tree):
        relative = str(path.relative_to(tree))
        where = f"rootfs/{relative}"
        fixed = any(relative.startswith(d + "/") for d in OVERLAY_DIRECTORIES)
        try:
            info = read_elf(path)
        except ElfFormatError as exc:
            checks.add(where, f"is not a usable ELF file: {exc}")
            continue
        if info.interpreter and not info.soname:
            loader = info.interpreter.lstrip("/")
            if not ((root / loader).exists() or (tree / loader).exists()):
                checks.add(
                    where,
                    f"needs the loader {info.interpreter}, which the image does not have",
                    hint="build it for x86_64 glibc, or statically",
                )
        for soname in info.needed:
            if fixed and not _find_library(soname, tree, root, own=False):
                checks.add(
                    where,
                    f"needs {soname}, which the image's root does not have; a program at a "
                    "fixed path runs without the extension's libraries",
                    hint="link it statically (upstream kubelet and CNI plugins are)",
                )
            elif not _find_library(soname, tree, root):
                checks.add(
                    where,
                    f"needs {soname}, which neither the image's root nor the extension has",
                    hint=f"put {soname} in rootfs/usr/lib/x86_64-linux-gnu/",
                )


def _stage(manifest: ExtensionManifest, tree: Path, staging: Path) -> None:
    shutil.copytree(tree, staging, symlinks=True)
    (staging / "manifest.yaml").write_text(manifest.to_yaml())
    for path in walk_sorted(staging):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        runnable = path.is_dir() or mode & 0o111
        os.chmod(path, 0o755 if runnable else 0o644)
    for path in [staging, *walk_sorted(staging)]:
        os.utime(path, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH), follow_symlinks=False)


def build_extension(
    source: Path, out: Path, key: ed25519.Ed25519PrivateKey, root: Path
) -> tuple[SignedInfo, ExtensionManifest]:
    """Check ``source`` (a directory or an OCI layout) against ``root`` (the image's root
    tree), and write the signed squashfs ``out``. Nothing is written when it fails."""
    with tempfile.TemporaryDirectory(prefix="basalt-extension-") as work:
        directory = unpack_source(source, Path(work))
        manifest, tree = check_source(directory, root)
        if parse_manifest(manifest.to_yaml()) != manifest:
            raise ImageBuildError(f"extension {manifest.name}: manifest does not round-trip")
        staging = Path(work) / "staging"
        _stage(manifest, tree, staging)
        image = Path(work) / "image.sqfs"
        make_squashfs(staging, image)
        out.parent.mkdir(parents=True, exist_ok=True)
        return sign_squashfs(image, out, key, manifest), manifest
