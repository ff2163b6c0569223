"""Verify an upgrade bundle (a directory or an uncompressed tar file) before using it.

The checks run in a fixed order and each failure has its own error class:

1. ``manifest.json`` present, small, canonical, well formed  -> ImageManifestError
2. ``manifest.sig`` present                                 -> UnsignedImageError
3. its key id names a trusted key                           -> UnknownSigningKeyError
4. the Ed25519 signature over the manifest bytes is valid   -> ImageSignatureError
5. the manifest's architecture is the expected one          -> ImageArchitectureError
6. the payload the caller requires is listed (``required``),
   every listed file present, of the signed size and sha256,
   and nothing else in the bundle                           -> ImagePayloadError

A tar file that holds something unsafe (absolute path, ``..``, link, device, a name
twice) or is not a tar file at all fails with ImageFormatError when it is met.
Nothing in the manifest is acted on before step 4 succeeds; payload files are hashed
in 1 MiB chunks, so memory stays flat whatever their size. Nothing is written.

A tar bundle can also be verified while it arrives (:func:`verify_tar_stream`): every
byte read is copied to the file it is received into, so the checks end with the upload
and each byte is hashed once. Either way a verified tar file comes with its layout (where
each member's bytes are) and its seal (:class:`FileSeal`): a slot writer copies the
members from there without hashing them again, and refuses a file that changed since.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Protocol, cast

from ..errors import BasaltError
from ._stream import (
    FileSeal,
    NotRegularFileError,
    Reader,
    Writer,
    digest,
    open_regular,
    read_small,
)
from ._tar import TarReader, open_tar_stream
from .errors import (
    ImageArchitectureError,
    ImageFormatError,
    ImageManifestError,
    ImagePayloadError,
    ImageSignatureError,
    UnknownSigningKeyError,
    UnsignedImageError,
)
from .keys import VerificationKey
from .manifest import (
    ARCHITECTURES,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
    Manifest,
    ManifestFormatError,
    PayloadFile,
    parse_manifest,
)
from .signature import SignatureFormatError, parse_signature, signature_valid

TrustedKeys = Iterable[VerificationKey] | Mapping[str, VerificationKey]
BundleForm = Literal["directory", "tar"]

_REFETCH = "fetch the bundle again from where it was published, or rebuild it"


@dataclass(frozen=True)
class Extent:
    """Where a member's bytes are in a tar file."""

    offset: int
    size: int


@dataclass(frozen=True)
class TarLayout:
    """Every member of a verified tar file (manifest, signature, payload) by name, and the
    seal of the file that was verified."""

    extents: Mapping[str, Extent]
    seal: FileSeal


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature, architecture and payload have all checked out."""

    source: Path
    form: BundleForm
    manifest: Manifest
    manifest_bytes: bytes
    key: VerificationKey
    #: Tar bundles: where each member is, and the seal of the file (None for directories).
    layout: TarLayout | None = None

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def architecture(self) -> str:
        return self.manifest.architecture

    @property
    def schematic_id(self) -> str:
        return self.manifest.schematic_id

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()


def check_architecture(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise BasaltError(
            f"unknown architecture {arch!r}", hint=f"choose one of {', '.join(ARCHITECTURES)}"
        )
    return arch


class BundleChecks:
    """The checks, each raising its own error; shared by the directory and tar readers."""

    def __init__(
        self,
        source: Path,
        keys: TrustedKeys,
        arch: str,
        required: Iterable[str] = (),
        label: str | None = None,
    ) -> None:
        self.label = label or str(source)
        self.keys = dict(keys) if isinstance(keys, Mapping) else {k.key_id: k for k in keys}
        self.arch = check_architecture(arch)
        self.required = tuple(required)

    # 1-5: the manifest and its signature ---------------------------------------------------
    def manifest_problem(self, problem: str) -> ImageManifestError:
        return ImageManifestError(
            self.label,
            f"{MANIFEST_NAME} {problem}",
            hint=f"a bundle made by `basaltctl bundle create` has a valid one; {_REFETCH}",
        )

    def parse(self, manifest_bytes: bytes | None) -> Manifest:
        """Check 1: the manifest is there and well formed (parsed, not yet trusted)."""
        if manifest_bytes is None:
            raise self.manifest_problem("is missing")
        try:
            return parse_manifest(manifest_bytes)
        except ManifestFormatError as exc:
            raise self.manifest_problem(f"is malformed: {exc}") from None

    def authenticate(
        self, manifest: Manifest, manifest_bytes: bytes, signature_bytes: bytes | None
    ) -> VerificationKey:
        """Checks 2-5: signed, by a trusted key, validly, for this architecture."""
        if signature_bytes is None:
            raise UnsignedImageError(
                self.label,
                f"there is no {SIGNATURE_NAME}: the bundle is not signed",
                hint="sign it with `basaltctl bundle create --key`; unsigned bundles are refused",
            )
        try:
            signature = parse_signature(signature_bytes)
        except SignatureFormatError as exc:
            raise ImageSignatureError(
                self.label, f"{SIGNATURE_NAME} is malformed: {exc}", hint=_REFETCH
            ) from None
        key = self.keys.get(signature.key_id)
        if key is None:
            raise UnknownSigningKeyError(self.label, signature.key_id, sorted(self.keys))
        if not signature_valid(manifest_bytes, signature, key.public_key):
            raise ImageSignatureError(
                self.label,
                f"the signature by {key.label} does not match {MANIFEST_NAME}: "
                "the manifest was changed after signing, or the signature belongs to another",
                hint=f"do not use this bundle; {_REFETCH}",
            )
        # From here on the manifest is trusted.
        if manifest.architecture != self.arch:
            raise ImageArchitectureError(
                self.label,
                f"built for {manifest.architecture}, expected {self.arch}",
                hint=f"use the {self.arch} bundle of version {manifest.version}",
            )
        return key

    # 6: the payload --------------------------------------------------------------------------
    def require(self, manifest: Manifest) -> None:
        """The (trusted) manifest lists every payload file the caller needs."""
        for name in self.required:
            if manifest.file(name) is None:
                raise self.payload(
                    name,
                    "is required here but the signed manifest does not list it",
                    "use a bundle built for this platform (container nodes run basalt.tar; "
                    "metal nodes boot kernel, initramfs and rootfs.squashfs)",
                )

    def payload(self, path: str, problem: str, hint: str = _REFETCH) -> ImagePayloadError:
        return ImagePayloadError(self.label, path, problem, hint=hint)

    def extra(self, path: str) -> ImagePayloadError:
        return self.payload(
            path,
            "is not listed in the signed manifest",
            "a bundle may hold only the files its manifest lists; remove it or rebuild the bundle",
        )

    def missing(self, path: str) -> ImagePayloadError:
        return self.payload(path, "is missing (the signed manifest lists it)")

    def size_mismatch(self, want: PayloadFile, got: int) -> ImagePayloadError:
        kind = "truncated" if got < want.size else "larger than signed"
        return self.payload(want.path, f"{kind}: {got} bytes, the signed manifest says {want.size}")

    def check_content(self, want: PayloadFile, reader: Reader) -> None:
        count, sha256 = digest(reader, want.size)
        if count != want.size:
            raise self.size_mismatch(want, count)
        if sha256 != want.sha256:
            raise self.payload(
                want.path,
                f"tampered: sha256 {sha256}, the signed manifest says {want.sha256}",
                f"do not use this bundle; {_REFETCH}",
            )


def verify_bundle(
    source: str | os.PathLike[str],
    trusted_keys: TrustedKeys,
    expected_arch: str,
    *,
    required: Iterable[str] = (),
    label: str | None = None,
) -> VerifiedBundle:
    """Check a bundle completely (see the module docstring for the order); write nothing.

    ``required`` names payload files that must be listed (e.g. ``required_payload("container")``);
    ``label`` names the bundle in messages instead of its path (an upload's temp file).
    Raises an :class:`ImageVerificationError` subclass naming the failed check.
    """
    path = Path(source)
    checks = BundleChecks(path, trusted_keys, expected_arch, required, label)
    if path.is_dir():
        return _verify_directory(path, checks)
    if path.is_file():
        return _verify_tar(path, checks)
    what = "does not exist" if not path.exists() else "is not a directory or a regular file"
    raise ImageFormatError(
        str(path), what, hint="give a bundle directory or tar file made by basaltctl bundle create"
    )


# -- directories ----------------------------------------------------------------------------------


def _read_header_file(directory: Path, name: str, limit: int, checks: BundleChecks) -> bytes | None:
    try:
        return read_small(directory / name, limit)
    except NotRegularFileError:
        problem = "is not a regular file (a symlink, directory or device)"
    except ValueError as exc:
        problem = str(exc)
    if name == MANIFEST_NAME:
        raise checks.manifest_problem(problem)
    raise ImageSignatureError(checks.label, f"{name} {problem}", hint=_REFETCH)


def _verify_directory(directory: Path, checks: BundleChecks) -> VerifiedBundle:
    manifest_bytes = _read_header_file(directory, MANIFEST_NAME, MAX_MANIFEST_BYTES, checks)
    manifest = checks.parse(manifest_bytes)
    assert manifest_bytes is not None
    signature_bytes = _read_header_file(directory, SIGNATURE_NAME, MAX_SIGNATURE_BYTES, checks)
    key = checks.authenticate(manifest, manifest_bytes, signature_bytes)
    checks.require(manifest)

    listed = {f.path for f in manifest.files}
    extra = sorted(set(os.listdir(directory)) - listed - {MANIFEST_NAME, SIGNATURE_NAME})
    if extra:
        raise checks.extra(extra[0])
    opened: list[tuple[PayloadFile, int]] = []
    try:
        for want in manifest.files:  # open and size everything before hashing anything
            try:
                fd, info = open_regular(directory / want.path)
            except FileNotFoundError:
                raise checks.missing(want.path) from None
            except NotRegularFileError:
                raise checks.payload(
                    want.path, "is not a regular file", "bundles hold regular files only"
                ) from None
            opened.append((want, fd))
            if info.st_size != want.size:
                raise checks.size_mismatch(want, info.st_size)
        for want, fd in opened:
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as handle:
                checks.check_content(want, handle)
    finally:
        for _, fd in opened:
            os.close(fd)
    return VerifiedBundle(directory, "directory", manifest, manifest_bytes, key)


# -- tar files ------------------------------------------------------------------------------------


def _verify_tar(path: Path, checks: BundleChecks) -> VerifiedBundle:
    with open(path, "rb") as raw:
        seal = FileSeal.of(raw.fileno())
        with open_tar_stream(raw, checks.label) as tar:
            found = _verify_tar_stream(TarReader(tar, checks.label), checks)
        changed = seal.broken(raw.fileno())
    if changed is not None:
        raise ImageFormatError(
            checks.label,
            f"the file changed while it was verified: {changed}",
            hint="verify it again once nothing writes to it",
        )
    return found.bundle(path, seal)


class _StreamSource(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Tee:
    """A reader that copies every byte it reads to ``sink``."""

    def __init__(self, source: _StreamSource, sink: Writer) -> None:
        self.source = source
        self.sink = sink

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        if data:
            self.sink.write(data)
        return data


def verify_tar_stream(
    source: _StreamSource,
    sink: IO[bytes],
    path: str | os.PathLike[str],
    trusted_keys: TrustedKeys,
    expected_arch: str,
    *,
    required: Iterable[str] = (),
    label: str | None = None,
) -> VerifiedBundle:
    """Verify a tar bundle as it is read from ``source``, copying every byte to ``sink``,
    the file at ``path`` (opened for writing, empty). The checks are :func:`verify_bundle`'s,
    in its order, so a bad manifest or signature stops the stream at its first kilobytes.
    Once the checks pass, the rest of the stream (the tar's end blocks) is copied too and
    ``sink`` is flushed; the result is the bundle at ``path``, sealed. It is not fsynced:
    what a receiver keeps across a power cut it copies durably (a staged bundle), and what
    it installs at once it reads back from the page cache and then removes, so the kernel
    need never write it.
    """
    checks = BundleChecks(Path(path), trusted_keys, expected_arch, required, label)
    tee = _Tee(source, sink)
    with open_tar_stream(cast(IO[bytes], tee), checks.label) as tar:
        found = _verify_tar_stream(TarReader(tar, checks.label), checks)
    sink.flush()
    return found.bundle(Path(path), FileSeal.of(sink.fileno()))


@dataclass(frozen=True)
class _Found:
    """What verifying a tar stream found, before it is tied to a file."""

    manifest: Manifest
    manifest_bytes: bytes
    key: VerificationKey
    extents: Mapping[str, Extent]

    def bundle(self, path: Path, seal: FileSeal) -> VerifiedBundle:
        layout = TarLayout(self.extents, seal)
        return VerifiedBundle(path, "tar", self.manifest, self.manifest_bytes, self.key, layout)


def _verify_tar_stream(reader: TarReader, checks: BundleChecks) -> _Found:
    extents: dict[str, Extent] = {}

    def at(member: tarfile.TarInfo) -> tarfile.TarInfo:
        extents[member.name] = Extent(member.offset_data, member.size)
        return member

    first = reader.next()
    if first is None or first.name != MANIFEST_NAME:
        found = "the tar file is empty" if first is None else f"the first member is {first.name!r}"
        raise checks.manifest_problem(f"is missing: it must be the first member; {found}")
    try:
        manifest_bytes = reader.read_small(at(first), MAX_MANIFEST_BYTES)
    except ValueError as exc:
        raise checks.manifest_problem(str(exc)) from None
    manifest = checks.parse(manifest_bytes)
    second = reader.next()
    signature_bytes = None
    if second is not None and second.name == SIGNATURE_NAME:
        try:
            signature_bytes = reader.read_small(at(second), MAX_SIGNATURE_BYTES)
        except ValueError as exc:
            raise ImageSignatureError(
                checks.label, f"{SIGNATURE_NAME} {exc}", hint=_REFETCH
            ) from None
        second = None
    key = checks.authenticate(manifest, manifest_bytes, signature_bytes)
    checks.require(manifest)

    pending = {f.path: f for f in manifest.files}
    member = second if second is not None else reader.next()
    while member is not None:
        want = pending.pop(member.name, None)
        if want is None:
            raise checks.extra(member.name)
        if member.size != want.size:
            raise checks.size_mismatch(want, member.size)
        try:
            checks.check_content(want, reader.open_reader(at(member)))
        except tarfile.TarError:
            raise checks.payload(want.path, "truncated: the tar file ends inside it") from None
        member = reader.next()
    if pending:
        raise checks.missing(sorted(pending)[0])
    reader.finish()
    return _Found(manifest, manifest_bytes, key, extents)
