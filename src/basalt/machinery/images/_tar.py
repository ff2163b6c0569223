"""Reading a bundle's tar stream: one pass, every member checked before its bytes are used.

The verifier hashes a member's bytes and the slot writers later copy the same member by its
extent (offset, size) in the file. That is only safe if the bytes tarfile hands out for a
member are exactly the bytes stored at that extent, so this reader refuses everything that
makes them differ, before the member's data is read:

* sparse members (GNU type ``S``, or PAX ``GNU.sparse.*`` keys): tarfile expands their holes,
  so what is hashed is not what is stored;
* a PAX ``size`` key, or any member whose logical size differs from the size its own header
  stores (what another tar reader, and the extent, would use);
* global PAX headers (they would change every later member);
* anything but zero bytes after the last member (an invalid header ends tarfile's iteration
  silently, so bytes there were never looked at), and more end padding than a tar writer adds.
"""

from __future__ import annotations

import datetime as dt
import tarfile
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import IO, Any, cast

from ._stream import CHUNK, Reader
from .errors import ImageFormatError

#: PAX and GNU long-name headers are read into memory whole: keep them small.
MAX_EXTENDED_HEADER = 64 * 1024
_EXTENDED_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
    | {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)
#: After the last member: two zero blocks, padded with zeros to a 10 KiB record.
BLOCKSIZE = tarfile.BLOCKSIZE
MAX_TAIL = tarfile.RECORDSIZE + 2 * BLOCKSIZE

#: tarfile reads a stream 10 KiB at a time unless told; more costs less per byte, and it
#: holds about three reads at once (it joins them), so memory stays under 1 MiB.
TAR_READ = 256 * 1024

_HINT = "bundles are flat tar files of regular files; rebuild it with basaltctl"


class RefusedHeaderError(tarfile.TarError):
    """A header this reader refuses (raised inside tarfile, before the member's data)."""


def _refuse_sparse(*_: object) -> None:
    raise RefusedHeaderError(
        "a sparse member (GNU sparse headers): its stored bytes are not its content"
    )


class BundleTarInfo(tarfile.TarInfo):
    """A tar header that remembers the size its own header block stores, and refuses
    oversized extended headers, global PAX headers and sparse members before tarfile acts
    on them."""

    stored_size: int = 0

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> BundleTarInfo:
        # tarfile's own four lines, plus: keep the block (the tail check needs the block
        # that ended the archive) and the size its header stores.
        fileobj = cast(IO[bytes], tar.fileobj)
        buf = fileobj.read(BLOCKSIZE)
        if isinstance(tar, BundleTarFile):
            tar.last_block = buf
        obj = cls.frombuf(buf, tar.encoding or "utf-8", tar.errors)
        obj.offset = fileobj.tell() - BLOCKSIZE
        obj.stored_size = obj.size
        return cast(BundleTarInfo, obj._proc_member(tar))  # tarfile makes each with cls

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.XGLTYPE:
            raise RefusedHeaderError("a global PAX header (it would change every later member)")
        if self.type in _EXTENDED_TYPES and self.size > MAX_EXTENDED_HEADER:
            raise RefusedHeaderError(
                f"an extended header of {self.size} bytes (at most {MAX_EXTENDED_HEADER})"
            )
        process: Callable[[tarfile.TarFile], tarfile.TarInfo] = super()._proc_member  # type: ignore[misc]
        return process(tar)

    # tarfile's sparse hooks: refuse before it reads a sparse map.
    _proc_sparse = _refuse_sparse
    _proc_gnusparse_00 = _refuse_sparse
    _proc_gnusparse_01 = _refuse_sparse
    _proc_gnusparse_10 = _refuse_sparse


class BundleTarFile(tarfile.TarFile):
    """A tar file that keeps the last header block it read."""

    last_block: bytes = b""


def open_tar_stream(raw: IO[bytes], label: str) -> BundleTarFile:
    try:
        tar = BundleTarFile.open(fileobj=raw, mode="r|", tarinfo=BundleTarInfo, bufsize=TAR_READ)
    except RefusedHeaderError as exc:
        raise ImageFormatError(label, f"refused tar header: {exc}", hint=_HINT) from None
    except (tarfile.TarError, ValueError, UnicodeError, OverflowError) as exc:
        raise ImageFormatError(
            label,
            f"not a directory or an uncompressed tar file ({exc})",
            hint="bundles are uncompressed tar files: decompress it first",
        ) from None
    return tar


def unsafe(member: tarfile.TarInfo) -> str | None:
    """Why a tar member may not be in a bundle, or None."""
    name = member.name
    if name.startswith("/"):
        return f"member {name!r} has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return f"member {name!r} has '..' in its path"
    if member.issym() or member.islnk():
        return f"member {name!r} is a link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return f"member {name!r} is a device"
    if member.isfifo():
        return f"member {name!r} is a FIFO"
    if member.isdir():
        return f"member {name!r} is a directory (bundles are flat)"
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return f"member {name!r} has unsupported tar type {member.type!r}"
    return _stored_differs(member)


def _stored_differs(member: tarfile.TarInfo) -> str | None:
    """Why the bytes tarfile reads for ``member`` might not be the bytes stored for it."""
    name = member.name
    if member.issparse():
        return f"member {name!r} is sparse (its stored bytes are not its content)"
    sparse_keys = sorted(k for k in member.pax_headers if k.startswith("GNU.sparse"))
    if sparse_keys:
        return f"member {name!r} has GNU sparse PAX keys ({', '.join(sparse_keys)})"
    if "size" in member.pax_headers:
        return f"member {name!r} has a PAX size override (sizes must be in the header itself)"
    stored = getattr(member, "stored_size", member.size)
    if stored != member.size:
        return f"member {name!r} stores {stored} bytes but its logical size is {member.size} bytes"
    return None


class TarReader:
    """Members of a tar stream, one pass, each checked for safety before use."""

    def __init__(self, tar: BundleTarFile, label: str) -> None:
        self.tar = tar
        self.label = label
        self.members: Iterator[tarfile.TarInfo] = iter(tar)
        self.seen: set[str] = set()

    def next(self) -> tarfile.TarInfo | None:
        try:
            member = next(self.members, None)
        except RefusedHeaderError as exc:
            raise self.format_error(f"refused tar header: {exc}") from None
        except (tarfile.TarError, ValueError, UnicodeError, OverflowError) as exc:
            raise self.format_error(f"unreadable tar header: {exc}") from None
        if member is None:
            return None
        problem = unsafe(member)
        if problem is None and member.name in self.seen:
            problem = f"member {member.name!r} appears twice"
        if problem is not None:
            raise self.format_error(problem)
        self.seen.add(member.name)
        return member

    def format_error(self, problem: str) -> ImageFormatError:
        return ImageFormatError(self.label, problem, hint=_HINT)

    def open(self, member: tarfile.TarInfo) -> IO[bytes]:
        handle = self.tar.extractfile(member)
        assert handle is not None  # regular members always have content
        return handle

    def open_reader(self, member: tarfile.TarInfo) -> Reader:
        return cast(Reader, self.open(member))  # an io.BufferedReader: it has readinto

    def read_small(self, member: tarfile.TarInfo, limit: int) -> bytes:
        if member.size > limit:
            raise ValueError(f"is {member.size} bytes, more than the {limit} allowed")
        try:
            data = self.open(member).read()
        except tarfile.TarError:
            raise ValueError("is cut short (the tar file is truncated)") from None
        return data

    def finish(self) -> None:
        """After the last member: read the rest of the stream (so a tee copies it all) and
        refuse anything but the zero blocks that end a tar file."""
        tail = len(self.tar.last_block)
        nonzero = self.tar.last_block.strip(b"\0") != b""
        stream: Any = self.tar.fileobj
        while chunk := stream.read(CHUNK):
            tail += len(chunk)
            nonzero = nonzero or chunk.strip(b"\0") != b""
            if nonzero or tail > MAX_TAIL:
                break
        if nonzero:
            raise self.format_error(
                "trailing bytes after the last member (only the zero blocks that end a tar "
                "file may follow it)"
            )
        if tail > MAX_TAIL:
            raise self.format_error(f"more than {MAX_TAIL} bytes of padding after the last member")


def created_epoch(created: str) -> int:
    """A manifest's ``created`` as seconds since 1970: its members' mtime."""
    moment = dt.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return int(moment.timestamp())


def member_info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    """The header of a bundle member as ``basaltctl bundle create`` writes it."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
