"""Delta uploads: a bundle sent as what the node does not already hold.

A node keeps the chunk index (:mod:`.chunks`) of the image it runs. A client that has it
sends a bundle as a *delta stream*: the manifest and its signature, the bundle's own chunk
index, then only the chunks of each indexed file whose sha256 the node's index does not
list (a file the bundle does not index goes whole). Both sides walk the same plan
(:func:`plan`), so the stream needs no framing past its head::

    b"BASALT-DELTA-1\\n"
    u32 big-endian length, manifest.json
    u32 big-endian length, manifest.sig
    chunks.json (its size is in the manifest)
    the chunks to send, in the bundle's order (each one's size is in chunks.json)

The node (:func:`assemble`) checks as :func:`~.verify.verify_tar_stream` does and in its
order: the manifest, the signature, the architecture, the required payload; then the
bundle's index against its sha256 in the signed manifest; each chunk received against
its sha256 in that index. A chunk the node holds is copied from where it lies (the running
slot's partition or files: bytes the node verified when it wrote them, read with
``sendfile``, not hashed again). It writes the bundle's tar file, byte for byte the one
``basaltctl bundle create`` wrote, so everything after (the seal, the slot writers, a
staged copy, verified again at boot) is what a whole upload gets.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from basalt.machinery.fileio import copy_range

from ._stream import CHUNK, FileSeal
from ._tar import created_epoch, member_info
from .chunks import CHUNKS_NAME, MAX_INDEX_BYTES, ChunkIndex, ChunkIndexError, parse_index
from .errors import ImageFormatError
from .manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
    Manifest,
    PayloadFile,
    parse_manifest,
)
from .verify import BundleChecks, Extent, TarLayout, TrustedKeys, VerifiedBundle

if TYPE_CHECKING:
    from collections.abc import Iterable

MAGIC = b"BASALT-DELTA-1\n"
_LENGTH = struct.Struct(">I")
#: The size of the byte strings a client's stream is cut into (one gRPC message each).
PIECE = 256 * 1024
_HINT = "upload the bundle whole (basaltctl upgrade --full-upload)"


@dataclass(frozen=True)
class Part:
    """A run of one payload file's bytes, in the order the plan walks them: ``sent`` in
    the stream (checked against ``sha256``: a chunk's, or with ``whole`` the file's), or
    held by the node."""

    path: str
    offset: int
    size: int
    sha256: str
    sent: bool
    whole: bool = False


def plan(manifest: Manifest, index: ChunkIndex, held: Iterable[tuple[str, int]]) -> Iterator[Part]:
    """The payload's parts in the stream's order, ``held`` being the chunks (sha256, size)
    the node holds: every payload file by path but the bundle's index (it comes first)."""
    holds = set(held)
    for want in manifest.files:
        if want.path == CHUNKS_NAME:
            continue
        chunks = index.files.get(want.path)
        if chunks is None:
            yield Part(want.path, 0, want.size, want.sha256, sent=True, whole=True)
            continue
        offset = 0
        for chunk in chunks:
            sent = (chunk.sha256, chunk.size) not in holds
            yield Part(want.path, offset, chunk.size, chunk.sha256, sent)
            offset += chunk.size


def held_chunk_ids(index_bytes: bytes) -> set[tuple[str, int]]:
    """The chunks (sha256, size) a node's index lists (ChunkIndexError when it is
    malformed)."""
    index = parse_index(index_bytes)
    return {(chunk.sha256, chunk.size) for chunks in index.files.values() for chunk in chunks}


# -- the client's side --------------------------------------------------------------------------
@dataclass(frozen=True)
class DeltaUpload:
    """A tar bundle as a delta stream against a node's index."""

    bundle: Path
    head: bytes
    extents: Mapping[str, Extent]
    parts: tuple[Part, ...]
    #: What a whole upload would send.
    bundle_size: int

    @property
    def size(self) -> int:
        """The bytes this stream sends."""
        return len(self.head) + sum(p.size for p in self.parts if p.sent)

    def pieces(self) -> Iterator[bytes]:
        """The stream, in byte strings of at most :data:`PIECE`."""
        for start in range(0, len(self.head), PIECE):
            yield self.head[start : start + PIECE]
        with open(self.bundle, "rb") as source:
            for part in self.parts:
                if not part.sent:
                    continue
                base = self.extents[part.path].offset + part.offset
                for start in range(0, part.size, PIECE):
                    piece = os.pread(source.fileno(), min(PIECE, part.size - start), base + start)
                    if not piece:
                        raise OSError(f"{self.bundle} ends inside {part.path}")
                    yield piece


def delta_upload(bundle: Path, node_index: bytes) -> DeltaUpload | None:
    """The delta stream of the tar ``bundle`` against a node's index, or None when there is
    none to make (the bundle has no chunk index, or it or the node's cannot be read):
    upload it whole then, and the node says what is wrong with it. Nothing here is
    trusted: the node checks everything."""
    try:
        held = held_chunk_ids(node_index)
        with tarfile.open(bundle, "r:") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            if not {MANIFEST_NAME, SIGNATURE_NAME, CHUNKS_NAME} <= set(members):
                return None
            blobs = {}
            for name in (MANIFEST_NAME, SIGNATURE_NAME, CHUNKS_NAME):
                handle = tar.extractfile(members[name])
                assert handle is not None
                blobs[name] = handle.read()
        manifest = parse_manifest(blobs[MANIFEST_NAME])
        index = parse_index(blobs[CHUNKS_NAME])
    except (tarfile.TarError, ValueError):  # the node names what is wrong with the bundle
        return None
    head = b"".join(
        (
            MAGIC,
            _LENGTH.pack(len(blobs[MANIFEST_NAME])),
            blobs[MANIFEST_NAME],
            _LENGTH.pack(len(blobs[SIGNATURE_NAME])),
            blobs[SIGNATURE_NAME],
            blobs[CHUNKS_NAME],
        )
    )
    extents = {name: Extent(m.offset_data, m.size) for name, m in members.items()}
    return DeltaUpload(
        bundle, head, extents, tuple(plan(manifest, index, held)), bundle.stat().st_size
    )


# -- the node's side ----------------------------------------------------------------------------
class _Source(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


#: Where a node holds a chunk (sha256, size): an open file descriptor and its offset in it.
Held = Mapping[tuple[str, int], tuple[int, int]]


def held_chunks(
    index: ChunkIndex, sources: Mapping[str, int]
) -> dict[tuple[str, int], tuple[int, int]]:
    """Where each chunk of ``index`` lies, for the files it indexes that have an open
    source in ``sources`` (payload name -> file descriptor)."""
    held: dict[tuple[str, int], tuple[int, int]] = {}
    for name, chunks in index.files.items():
        fd = sources.get(name)
        if fd is None:
            continue
        offset = 0
        for chunk in chunks:
            held.setdefault((chunk.sha256, chunk.size), (fd, offset))
            offset += chunk.size
    return held


class _Stream:
    """The delta stream as the node reads it: exact reads, the end named when it comes early."""

    def __init__(self, source: _Source, checks: BundleChecks) -> None:
        self.source = source
        self.checks = checks

    def read(self, size: int, what: str) -> bytes:
        parts = []
        left = size
        while left:
            data = self.source.read(min(left, CHUNK))
            if not data:
                raise ImageFormatError(
                    self.checks.label,
                    f"the delta stream ends inside {what} ({size - left} of {size} bytes)",
                    hint=_HINT,
                )
            parts.append(data)
            left -= len(data)
        return b"".join(parts)

    def blob(self, limit: int, what: str) -> bytes:
        (length,) = _LENGTH.unpack(self.read(_LENGTH.size, f"the length of {what}"))
        if length > limit:
            raise ImageFormatError(
                self.checks.label,
                f"{what} is {length} bytes, more than the {limit} allowed",
                hint=_HINT,
            )
        return self.read(length, what)


class _TarOut:
    """The bundle's tar file, written member by member as ``basaltctl bundle create`` does."""

    def __init__(self, fd: int, mtime: int) -> None:
        self.fd = fd
        self.mtime = mtime
        self.offset = 0
        self.extents: dict[str, Extent] = {}

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.offset += len(data)

    def begin(self, name: str, size: int) -> None:
        header = member_info(name, size, self.mtime).tobuf(
            tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"
        )
        self.write(header)
        self.extents[name] = Extent(self.offset, size)

    def copy(self, fd: int, offset: int, size: int) -> None:
        copy_range(fd, offset, size, self.fd)
        self.offset += size

    def end_member(self) -> None:
        _, remainder = divmod(self.offset, tarfile.BLOCKSIZE)
        if remainder:
            self.write(tarfile.NUL * (tarfile.BLOCKSIZE - remainder))

    def close(self) -> None:
        self.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        _, remainder = divmod(self.offset, tarfile.RECORDSIZE)
        if remainder:
            self.write(tarfile.NUL * (tarfile.RECORDSIZE - remainder))


def assemble(
    source: _Source,
    out: int,
    path: str | os.PathLike[str],
    trusted_keys: TrustedKeys,
    expected_arch: str,
    held: Held,
    *,
    required: Iterable[str] = (),
    label: str | None = None,
    limit: int | None = None,
) -> VerifiedBundle:
    """Read a delta stream from ``source`` and write the bundle's tar file to ``out`` (the
    file at ``path``, open for writing, empty), taking the chunks the node holds from
    ``held``. Raises what :func:`~.verify.verify_tar_stream` raises for the same faults,
    at the same point of the stream; the result is the bundle at ``path``, sealed (not
    fsynced: see verify_tar_stream)."""
    checks = BundleChecks(Path(path), trusted_keys, expected_arch, required, label)
    stream = _Stream(source, checks)
    if stream.read(len(MAGIC), "its first line") != MAGIC:
        raise ImageFormatError(
            checks.label, "this is not a delta stream (it does not start with BASALT-DELTA-1)",
            hint=_HINT,
        )  # fmt: skip
    manifest_bytes = stream.blob(MAX_MANIFEST_BYTES, MANIFEST_NAME)
    manifest = checks.parse(manifest_bytes)
    signature_bytes = stream.blob(MAX_SIGNATURE_BYTES, SIGNATURE_NAME)
    key = checks.authenticate(manifest, manifest_bytes, signature_bytes)
    checks.require(manifest)
    if limit is not None and manifest.total_size > limit:
        raise checks.payload(
            max(manifest.files, key=lambda f: f.size).path,
            f"the bundle's files add up to {manifest.total_size} bytes, more than {limit}",
        )
    index_bytes, index = _bundle_index(stream, manifest, checks)

    tar = _TarOut(out, created_epoch(manifest.created))
    for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, signature_bytes)):
        tar.begin(name, len(data))
        tar.write(data)
        tar.end_member()
    parts = plan(manifest, index, held)
    part = next(parts, None)
    for want in manifest.files:
        tar.begin(want.path, want.size)
        if want.path == CHUNKS_NAME:
            tar.write(index_bytes)
        copy = _HeldRun(tar, want, checks)
        while part is not None and part.path == want.path:
            if part.sent:
                copy.flush()
                _receive_part(part, want, stream, tar, checks)
            else:
                copy.add(*held[part.sha256, part.size], part)
            part = next(parts, None)
        copy.flush()
        tar.end_member()
    tar.close()
    if source.read(1):
        raise ImageFormatError(
            checks.label, "the delta stream goes on after its last chunk", hint=_HINT
        )
    layout = TarLayout(tar.extents, FileSeal.of(out))
    return VerifiedBundle(Path(path), "tar", manifest, manifest_bytes, key, layout)


def _bundle_index(
    stream: _Stream, manifest: Manifest, checks: BundleChecks
) -> tuple[bytes, ChunkIndex]:
    """The bundle's chunk index from the stream, checked against the signed manifest."""
    want = manifest.file(CHUNKS_NAME)
    if want is None:
        raise checks.payload(
            CHUNKS_NAME,
            "is not in this bundle: a delta upload needs the bundle's chunk index",
            _HINT,
        )
    if want.size > MAX_INDEX_BYTES:
        raise checks.payload(
            CHUNKS_NAME, f"is {want.size} bytes, more than the {MAX_INDEX_BYTES} an index may be"
        )
    data = stream.read(want.size, CHUNKS_NAME)
    checks.check_content(want, io.BytesIO(data))
    try:
        index = parse_index(data)
        index.check_against(manifest)
    except ChunkIndexError as exc:
        raise checks.payload(CHUNKS_NAME, f"is not a usable chunk index: {exc}") from None
    return data, index


class _HeldRun:
    """Held chunks that lie one after the other in one source, copied with one sendfile."""

    def __init__(self, tar: _TarOut, want: PayloadFile, checks: BundleChecks) -> None:
        self.tar = tar
        self.want = want
        self.checks = checks
        self.run: tuple[int, int, int, int] | None = None  # fd, offset, size, file offset

    def add(self, fd: int, offset: int, part: Part) -> None:
        if self.run is not None:
            run_fd, run_offset, size, at = self.run
            if run_fd == fd and run_offset + size == offset:
                self.run = (fd, run_offset, size + part.size, at)
                return
            self.flush()
        self.run = (fd, offset, part.size, part.offset)

    def flush(self) -> None:
        if self.run is None:
            return
        fd, offset, size, at = self.run
        self.run = None
        try:
            self.tar.copy(fd, offset, size)
        except (OSError, EOFError) as exc:
            raise self.checks.payload(
                self.want.path,
                f"the {size} bytes at byte {at} could not be copied from the running image: {exc}",
                _HINT,
            ) from None


def _receive_part(
    part: Part, want: PayloadFile, stream: _Stream, tar: _TarOut, checks: BundleChecks
) -> None:
    """A part sent in the stream: written, and checked against its signed sha256."""
    if part.whole:
        sha = hashlib.sha256()
        left = part.size
        while left:
            data = stream.read(min(left, CHUNK), want.path)
            sha.update(data)
            tar.write(data)
            left -= len(data)
        digest = sha.hexdigest()
    else:
        data = stream.read(part.size, f"{want.path}'s chunk at byte {part.offset}")
        digest = hashlib.sha256(data).hexdigest()
        tar.write(data)
    if digest != part.sha256:
        where = "" if part.whole else f"its chunk at byte {part.offset} "
        raise checks.payload(
            want.path,
            f"tampered: {where}has sha256 {digest}, the signed "
            f"{'manifest' if part.whole else CHUNKS_NAME} says {part.sha256}",
        )
