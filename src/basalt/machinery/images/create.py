"""Create a signed upgrade bundle: hash the payload, write manifest, signature and files.

The output is reproducible: the same files, version, schematic, architecture, key and
creation time (``SOURCE_DATE_EPOCH``) give byte-identical bundles, tar or directory.
It appears whole or not at all (built beside the target, then renamed into place).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from ._stream import (
    NotRegularFileError,
    Writer,
    digest,
    fsync_directory,
    open_regular,
)
from ._tar import created_epoch, member_info
from .chunks import CHUNKS_NAME, index_files
from .errors import BundleInputError
from .manifest import (
    ARCHITECTURES,
    MANIFEST_NAME,
    SCHEMATIC_RE,
    SIGNATURE_NAME,
    Manifest,
    PayloadFile,
    check_payload_name,
    check_version,
    created_from_epoch,
    format_created,
)
from .payload import ROOTFS, required_payload
from .signature import sign

_MAX_SIZE = 1 << 62


def _check_inputs(
    files: Mapping[str, Path], version: str, schematic_id: str, arch: str, platform: str | None
) -> None:
    problems = [check_version(version)]
    if platform is not None:
        problems.extend(
            f"a {platform} bundle needs the payload {name!r}"
            for name in required_payload(platform)
            if name not in files
        )
    if not SCHEMATIC_RE.fullmatch(schematic_id):
        problems.append(
            f"schematic id {schematic_id!r} must be lowercase letters, digits, '.', '_', '-'"
        )
    if arch not in ARCHITECTURES:
        problems.append(f"architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    if not files:
        problems.append("no payload files given")
    problems.extend(check_payload_name(name) for name in files)
    if CHUNKS_NAME in files:
        problems.append(f"{CHUNKS_NAME!r} is the name of the bundle's own chunk index")
    found = [p for p in problems if p]
    if found:
        raise BundleInputError("; ".join(found), hint="nothing was written")


def _hash_file(name: str, path: Path, sink: Writer | None = None) -> PayloadFile:
    try:
        fd, info = open_regular(path)
    except FileNotFoundError:
        raise BundleInputError(f"{name}: {path} does not exist", hint="check the path") from None
    except (NotRegularFileError, OSError) as exc:
        raise BundleInputError(f"{name}: {path} cannot be read: {exc}") from None
    with os.fdopen(fd, "rb", buffering=0) as handle:
        size, sha256 = digest(handle, _MAX_SIZE, sink)
    if size != info.st_size:
        raise BundleInputError(f"{name}: {path} changed while it was read", hint="run again")
    return PayloadFile(name, size, sha256)


def _copy_checked(want: PayloadFile, path: Path, sink: Writer) -> None:
    """Copy ``path`` into ``sink``; it must still be what was hashed for the manifest."""
    if _hash_file(want.path, path, sink) != want:
        raise BundleInputError(
            f"{want.path}: {path} changed after it was hashed", hint="run again once it is stable"
        )


class _HashingReader:
    """Hands a file to tarfile while hashing what it reads, to check it against the manifest."""

    def __init__(self, handle: io.RawIOBase) -> None:
        self.handle = handle
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, count: int = -1) -> bytes:
        data = self.handle.read(count) or b""
        self.sha.update(data)
        self.size += len(data)
        return data


def _add_checked(tar: tarfile.TarFile, want: PayloadFile, path: Path, mtime: int) -> None:
    """Add ``path`` as ``want.path``; it must still be what was hashed for the manifest."""
    changed = BundleInputError(
        f"{want.path}: {path} changed after it was hashed", hint="run again once it is stable"
    )
    fd, _ = open_regular(path)
    with os.fdopen(fd, "rb", buffering=0) as handle:
        reader = _HashingReader(handle)
        try:
            tar.addfile(member_info(want.path, want.size, mtime), reader)
        except OSError:
            raise changed from None
        if handle.read(1) or (reader.size, reader.sha.hexdigest()) != (want.size, want.sha256):
            raise changed


def _write_tar(
    target: Path, manifest: Manifest, blobs: dict[str, bytes], files: Mapping[str, Path]
) -> None:
    mtime = created_epoch(manifest.created)
    with open(target, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in (MANIFEST_NAME, SIGNATURE_NAME):
                tar.addfile(member_info(name, len(blobs[name]), mtime), io.BytesIO(blobs[name]))
            for want in manifest.files:
                _add_checked(tar, want, files[want.path], mtime)
        raw.flush()
        os.fsync(raw.fileno())


def _write_directory(
    target: Path, manifest: Manifest, blobs: dict[str, bytes], files: Mapping[str, Path]
) -> None:
    target.mkdir()
    for name, data in blobs.items():
        with open(target / name, "wb") as handle:
            handle.write(data)
            os.fsync(handle.fileno())
    for want in manifest.files:
        with open(target / want.path, "wb") as handle:
            _copy_checked(want, files[want.path], handle)
            handle.flush()
            os.fsync(handle.fileno())
    mtime = created_epoch(manifest.created)
    for path in target.iterdir():
        path.chmod(0o644)
        os.utime(path, (mtime, mtime))
    os.utime(target, (mtime, mtime))
    fsync_directory(target)


def _replace(temp: Path, out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise BundleInputError(f"{out} already exists", hint="pass --force to replace it")
        if out.is_dir() and not out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "bundle")
            os.replace(temp, out)
            shutil.rmtree(old)
            return
    os.replace(temp, out)


def create_bundle(
    out: str | os.PathLike[str],
    files: Mapping[str, str | os.PathLike[str]],
    version: str,
    schematic_id: str,
    arch: str,
    signing_key: ed25519.Ed25519PrivateKey,
    *,
    created: dt.datetime | None = None,
    tar: bool | None = None,
    overwrite: bool = False,
    platform: str | None = None,
    chunked: bool | None = None,
) -> Manifest:
    """Write a signed bundle of ``files`` (payload name -> path) to ``out``; return its manifest.

    ``out`` is a tar file when ``tar`` is true (default: when it ends in ``.tar``), else
    a directory. ``created`` defaults to ``SOURCE_DATE_EPOCH`` when set, else now.
    ``platform`` (``metal``, ``container``) checks that its required payload is given.
    ``chunked`` adds a chunk index of the payload (``chunks.json``, :mod:`.chunks`: what
    lets an upload leave out what a node already holds); default: when the payload holds
    a root filesystem. Raises :class:`BundleInputError` (nothing written) for a bad input.
    """
    target = Path(out)
    paths = {name: Path(path) for name, path in files.items()}
    _check_inputs(paths, version, schematic_id, arch, platform)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise BundleInputError(f"{target} already exists", hint="pass --force to replace it")
    try:
        stamp = (
            format_created(created)
            if created is not None
            else created_from_epoch(os.environ.get("SOURCE_DATE_EPOCH"))
        )
    except ValueError as exc:
        raise BundleInputError(str(exc), hint="SOURCE_DATE_EPOCH is seconds since 1970") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        hashed = [_hash_file(n, p) for n, p in paths.items()]  # names what cannot be read
        if chunked or (chunked is None and ROOTFS in paths):
            index, indexed = index_files(paths)
            changed = [f.path for f in hashed if indexed[f.path] != f.sha256]
            if changed:
                raise BundleInputError(f"{changed[0]} changed while it was read", hint="run again")
            (temp / CHUNKS_NAME).write_bytes(index.encode())
            paths[CHUNKS_NAME] = temp / CHUNKS_NAME
            hashed.append(_hash_file(CHUNKS_NAME, paths[CHUNKS_NAME]))
        payload = tuple(sorted(hashed, key=lambda f: f.path))
        manifest = Manifest(version, schematic_id, arch, stamp, payload)
        _write(target, manifest, paths, signing_key, tar, temp, overwrite)
        return manifest
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(temp)


def _write(
    target: Path,
    manifest: Manifest,
    paths: dict[str, Path],
    signing_key: ed25519.Ed25519PrivateKey,
    tar: bool | None,
    temp: Path,
    overwrite: bool,
) -> None:
    manifest_bytes = manifest.encode()
    blobs = {MANIFEST_NAME: manifest_bytes, SIGNATURE_NAME: sign(manifest_bytes, signing_key)}

    as_tar = target.suffix == ".tar" if tar is None else tar
    built = temp / "bundle"
    (_write_tar if as_tar else _write_directory)(built, manifest, blobs, paths)
    _replace(built, target, overwrite)
    fsync_directory(target.parent)
