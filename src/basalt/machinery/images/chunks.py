"""Chunk indexes: each large payload file cut into content-defined chunks, with their sizes
and sha256, so that an upload can leave out what a node already holds (``delta.py``).

A bundle that carries one lists it as an ordinary payload file, ``chunks.json``: its
sha256 is in the signed manifest like any other file's, so each chunk's hash is signed
through it; a node that does not know the file installs the bundle as before. A metal
node keeps the index of what each slot holds next to that slot's kernel on the ESP.

Cutting: a chunk ends just after the first occurrence of :data:`ANCHOR` at least
:data:`MIN_CHUNK` bytes into it, or at :data:`MAX_CHUNK` bytes. Where a chunk ends depends
on the bytes around the anchor only, so an insertion or removal early in a file moves
the later boundaries with the data and the later chunks are found again. In compressed
data (a squashfs root, a compressed kernel or initramfs) the two anchor bytes occur once
every 64 KiB on average: chunks of about 80 KiB.

The index is canonical JSON (sorted keys, no whitespace)::

    {"chunking":"anchor-5ac3-16k-512k","files":{"rootfs.squashfs":[[SIZE,"SHA256"],...]},
     "formatVersion":1}
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .manifest import Manifest, canonical_json, check_payload_name
from .payload import CHUNKS_NAME

__all__ = ["CHUNKS_NAME", "ChunkIndex", "ChunkIndexError", "index_files", "parse_index"]

INDEX_FORMAT = 1
ANCHOR = b"\x5a\xc3"
MIN_CHUNK = 16 << 10
MAX_CHUNK = 512 << 10
CHUNKING = "anchor-5ac3-16k-512k"
#: An index of a few GiB of payload stays well under this.
MAX_INDEX_BYTES = 4 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class ChunkIndexError(ValueError):
    """An index that is not well formed, or does not match the manifest it came with."""


@dataclass(frozen=True)
class Chunk:
    size: int
    sha256: str


@dataclass(frozen=True)
class ChunkIndex:
    """Each indexed file's chunks, in order."""

    files: Mapping[str, tuple[Chunk, ...]]
    chunking: str = CHUNKING

    def encode(self) -> bytes:
        return canonical_json(
            {
                "chunking": self.chunking,
                "files": {
                    name: [[c.size, c.sha256] for c in chunks]
                    for name, chunks in sorted(self.files.items())
                },
                "formatVersion": INDEX_FORMAT,
            }
        )

    def size_of(self, name: str) -> int:
        return sum(c.size for c in self.files[name])

    def check_against(self, manifest: Manifest) -> None:
        """Every indexed file is a payload file of ``manifest``, of the same size."""
        for name in sorted(self.files):
            want = manifest.file(name)
            if want is None:
                raise ChunkIndexError(f"files.{name}: the manifest lists no such payload file")
            if self.size_of(name) != want.size:
                raise ChunkIndexError(
                    f"files.{name}: its chunks add up to {self.size_of(name)} bytes; the "
                    f"manifest says {want.size}"
                )


def cut(data: bytes | mmap.mmap) -> Iterator[tuple[int, int]]:
    """The chunks of ``data`` as (offset, size)."""
    end_of_data = len(data)
    start = 0
    while start < end_of_data:
        found = data.find(ANCHOR, start + MIN_CHUNK - len(ANCHOR), start + MAX_CHUNK)
        end = found + len(ANCHOR) if found >= 0 else start + MAX_CHUNK
        end = min(end, end_of_data)
        yield start, end - start
        start = end


def chunk_file(path: Path) -> tuple[tuple[Chunk, ...], str]:
    """Cut the file at ``path`` and hash each chunk; also the whole file's sha256."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return (), hashlib.sha256().hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            chunks = tuple(
                Chunk(size, hashlib.sha256(data[start : start + size]).hexdigest())
                for start, size in cut(data)
            )
            return chunks, hashlib.sha256(data).hexdigest()


def index_files(files: Mapping[str, Path]) -> tuple[ChunkIndex, dict[str, str]]:
    """The index of ``files`` (payload name -> path), and each file's sha256 as it was
    read (the caller checks that the manifest's agree)."""
    cuts = {name: chunk_file(path) for name, path in sorted(files.items())}
    return (
        ChunkIndex({name: chunks for name, (chunks, _) in cuts.items()}),
        {name: whole for name, (_, whole) in cuts.items()},
    )


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise ChunkIndexError(problem)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _chunks(name: str, raw: object) -> tuple[Chunk, ...]:
    _require(isinstance(raw, list), f"files.{name} is not a list of [size, sha256]")
    assert isinstance(raw, list)
    chunks = []
    for number, item in enumerate(raw):
        where = f"files.{name}[{number}]"
        _require(isinstance(item, list) and len(item) == 2, f"{where} is not [size, sha256]")
        size, sha256 = item
        _require(_is_int(size) and 0 < size <= MAX_CHUNK, f"{where}: size is not 1-{MAX_CHUNK}")
        _require(
            isinstance(sha256, str) and bool(_SHA256_RE.fullmatch(sha256)),
            f"{where}: sha256 is not 64 lowercase hex digits",
        )
        chunks.append(Chunk(size, sha256))
    return tuple(chunks)


def parse_index(data: bytes) -> ChunkIndex:
    """Parse and check index bytes; :class:`ChunkIndexError` says what is wrong."""
    _require(len(data) <= MAX_INDEX_BYTES, f"is more than {MAX_INDEX_BYTES} bytes")
    try:
        raw: Any = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ChunkIndexError(f"not JSON: {exc}") from None
    _require(isinstance(raw, dict), "not a JSON object")
    _require(
        set(raw) == {"chunking", "files", "formatVersion"},
        "must have exactly the keys chunking, files, formatVersion",
    )
    _require(
        raw["formatVersion"] == INDEX_FORMAT,
        f"formatVersion {raw['formatVersion']!r} is not supported (this tool reads {INDEX_FORMAT})",
    )
    _require(isinstance(raw["chunking"], str), "chunking is not a string")
    files = raw["files"]
    _require(isinstance(files, dict), "files is not an object")
    for name in files:
        problem = check_payload_name(name) if isinstance(name, str) else "not a string"
        _require(problem is None, f"files: {problem}")
        _require(name != CHUNKS_NAME, f"files: {CHUNKS_NAME} cannot index itself")
    index = ChunkIndex({n: _chunks(n, c) for n, c in files.items()}, raw["chunking"])
    _require(index.encode() == data, "not in canonical form (sorted keys, no whitespace)")
    return index
