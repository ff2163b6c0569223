"""Chunk indexes and delta uploads: the bundle a node assembles from a delta stream and the
chunks it holds is byte for byte the bundle that was signed; every fault in the stream is
refused with the error a whole upload gets, naming the file."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from basalt.machinery.images import (
    ImageFormatError,
    ImagePayloadError,
    UnknownSigningKeyError,
    VerificationKey,
    create_bundle,
    generate_signing_key,
    load_signing_key,
    verification_key,
    verify_bundle,
)
from basalt.machinery.images.chunks import (
    CHUNKS_NAME,
    MAX_CHUNK,
    MIN_CHUNK,
    ChunkIndexError,
    cut,
    parse_index,
)
from basalt.machinery.images.delta import assemble, delta_upload, held_chunks

CREATED = dt.datetime(2025, 1, 31, 12, 0, tzinfo=dt.UTC)


def _payload(directory: Path, root: bytes, seed: int = 1) -> dict[str, Path]:
    directory.mkdir()
    rng = random.Random(seed)
    files = {
        "kernel": rng.randbytes(300_000),
        "initramfs": rng.randbytes(70_000),
        "rootfs.squashfs": root,
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return {name: directory / name for name in files}


def _bundle(tmp_path: Path, name: str, files: dict[str, Path], key_pem: str) -> Path:
    out = tmp_path / f"{name}.tar"
    create_bundle(out, files, name, "default", "x86_64", load_signing_key(key_pem), created=CREATED)
    return out


class _Pipe:
    """A delta stream read back in the odd sizes a network hands over."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.data = io.BytesIO(b"".join(pieces))

    def read(self, size: int = -1) -> bytes:
        return self.data.read(min(size, 7777) if size > 0 else 7777)


@pytest.fixture
def releases(tmp_path: Path, keypair: tuple[str, str]) -> dict[str, object]:
    """Two releases: the second's root has bytes inserted and changed in its middle."""
    rng = random.Random(7)
    root1 = rng.randbytes(3_000_000)
    root2 = root1[:1_000_000] + rng.randbytes(5000) + root1[1_000_000:2_000_000]
    root2 += bytes(x ^ 1 for x in root1[2_000_000:2_000_100]) + root1[2_000_100:]
    old = _payload(tmp_path / "old", root1)
    new = _payload(tmp_path / "new", root2)
    new["kernel"].write_bytes(old["kernel"].read_bytes())  # an unchanged kernel
    return {
        "old": _bundle(tmp_path, "0.1.0", old, keypair[0]),
        "new": _bundle(tmp_path, "0.2.0", new, keypair[0]),
        "old_files": old,
    }


@contextlib.contextmanager
def _held(files: dict[str, Path], index: bytes) -> Iterator[dict[tuple[str, int], tuple[int, int]]]:
    with contextlib.ExitStack() as stack:
        fds = {n: stack.enter_context(open(p, "rb")).fileno() for n, p in files.items()}
        yield held_chunks(parse_index(index), fds)


def _index_of(bundle: Path) -> bytes:
    import tarfile

    with tarfile.open(bundle) as tar:
        handle = tar.extractfile(CHUNKS_NAME)
        assert handle is not None
        return handle.read()


def _assemble(
    tmp_path: Path, stream: Iterator[bytes], trusted: list[VerificationKey], held: dict
) -> tuple[Path, object]:
    out = tmp_path / "assembled.tar"
    with open(out, "wb", buffering=0) as handle:
        verified = assemble(
            _Pipe(stream), handle.fileno(), out, trusted, "x86_64", held,
            required=("kernel", "initramfs", "rootfs.squashfs"), label="uploaded bundle",
        )  # fmt: skip
    return out, verified


def test_cut_boundaries_follow_the_content() -> None:
    rng = random.Random(3)
    data = rng.randbytes(2_000_000)
    chunks = [data[o : o + s] for o, s in cut(data)]
    assert b"".join(chunks) == data
    assert all(MIN_CHUNK <= len(c) <= MAX_CHUNK for c in chunks[:-1])
    assert 10 <= len(chunks) <= 40  # about 80 KiB each in random data
    # bytes inserted near the start: the chunks after it are found again
    moved = rng.randbytes(3000) + data
    found = {moved[o : o + s] for o, s in cut(moved)}
    assert sum(c in found for c in chunks) >= len(chunks) - 2
    assert list(cut(b"")) == []
    assert [s for _, s in cut(bytes(MAX_CHUNK * 2 + 5))] == [MAX_CHUNK, MAX_CHUNK, 5]


def test_a_delta_upload_assembles_the_signed_bundle_byte_for_byte(
    tmp_path: Path, releases: dict, trusted: list[VerificationKey]
) -> None:
    index = _index_of(releases["old"])
    upload = delta_upload(releases["new"], index)
    assert upload is not None
    # the kernel is held whole, the root mostly: about a tenth of the bundle is sent
    assert upload.size < upload.bundle_size * 0.3
    assert not [p for p in upload.parts if p.path == "kernel" and p.sent]
    with _held(releases["old_files"], index) as held:
        out, verified = _assemble(tmp_path, upload.pieces(), trusted, held)
    assert out.read_bytes() == releases["new"].read_bytes()
    assert verified.version == "0.2.0" and verified.layout is not None
    again = verify_bundle(out, trusted, "x86_64")
    assert again.layout is not None
    assert again.layout.extents == verified.layout.extents


def test_against_an_unrelated_node_everything_is_sent_and_checked(
    tmp_path: Path, releases: dict, trusted: list[VerificationKey]
) -> None:
    empty = b'{"chunking":"anchor-5ac3-16k-512k","files":{},"formatVersion":1}'
    upload = delta_upload(releases["new"], empty)
    assert upload is not None and all(p.sent for p in upload.parts)
    out, _ = _assemble(tmp_path, upload.pieces(), trusted, {})
    assert out.read_bytes() == releases["new"].read_bytes()


def _stream(upload: object) -> bytes:
    return b"".join(upload.pieces())  # type: ignore[attr-defined]


def test_a_changed_chunk_is_refused_naming_the_file(
    tmp_path: Path, releases: dict, trusted: list[VerificationKey]
) -> None:
    index = _index_of(releases["old"])
    upload = delta_upload(releases["new"], index)
    data = bytearray(_stream(upload))
    data[-10] ^= 0xFF  # in the last chunk sent: the root's
    with _held(releases["old_files"], index) as held, pytest.raises(ImagePayloadError) as err:
        _assemble(tmp_path, iter([bytes(data)]), trusted, held)
    assert "rootfs.squashfs" in str(err.value) and "tampered" in str(err.value)


@pytest.mark.parametrize(
    "cut_at, problem",
    [(5, "not a delta stream"), (-1, "ends inside"), (None, "goes on after")],
)
def test_a_stream_cut_short_or_running_on_is_refused(
    tmp_path: Path, releases: dict, trusted: list[VerificationKey], cut_at: int | None, problem: str
) -> None:
    index = _index_of(releases["old"])
    data = _stream(delta_upload(releases["new"], index))
    if cut_at == 5:
        data = b"X" + data[1:]
    elif cut_at == -1:
        data = data[:-1]
    else:
        data += b"\0"
    with _held(releases["old_files"], index) as held, pytest.raises(ImageFormatError) as err:
        _assemble(tmp_path, iter([data]), trusted, held)
    assert problem in str(err.value)


def test_an_untrusted_signer_is_refused_before_any_chunk(tmp_path: Path, releases: dict) -> None:
    other = [verification_key(generate_signing_key()[1], "other")]
    index = _index_of(releases["old"])
    head = delta_upload(releases["new"], index).head  # type: ignore[union-attr]
    with pytest.raises(UnknownSigningKeyError):
        _assemble(tmp_path, iter([head[:-1]]), other, {})


def test_an_index_that_does_not_match_the_manifest_is_refused(
    tmp_path: Path, releases: dict, trusted: list[VerificationKey]
) -> None:
    index = _index_of(releases["old"])
    upload = delta_upload(releases["new"], index)
    assert upload is not None
    head = bytearray(upload.head)
    head[-5] ^= 1  # a byte of the bundle's chunks.json, the head's last part
    body = _stream(upload)[len(head) :]
    with pytest.raises(ImagePayloadError) as err:
        _assemble(tmp_path, iter([bytes(head) + body]), trusted, {})
    assert CHUNKS_NAME in str(err.value) and "tampered" in str(err.value)


def test_no_delta_without_indexes(tmp_path: Path, keypair: tuple[str, str]) -> None:
    files = _payload(tmp_path / "plain", b"root" * 1000)
    plain = tmp_path / "plain.tar"
    create_bundle(
        plain, files, "0.3.0", "default", "x86_64", load_signing_key(keypair[0]),
        created=CREATED, chunked=False,
    )  # fmt: skip
    empty = b'{"chunking":"anchor-5ac3-16k-512k","files":{},"formatVersion":1}'
    assert delta_upload(plain, empty) is None
    assert delta_upload(plain, b"not an index") is None


@pytest.mark.parametrize(
    "raw, problem",
    [
        (b"[]", "not a JSON object"),
        (b'{"chunking":"x","files":{},"formatVersion":2}', "formatVersion 2"),
        (b'{"chunking":"x","files":{"k":[[0,"' + b"a" * 64 + b'"]]},"formatVersion":1}', "size"),
        (b'{"chunking":"x","files":{"k":[[1,"zz"]]},"formatVersion":1}', "sha256"),
        (b'{"chunking":"x","files":{"../k":[]},"formatVersion":1}', "plain file name"),
        (b'{"files":{},"chunking":"x","formatVersion":1}', "canonical"),
    ],
)
def test_index_refusals_name_the_field(raw: bytes, problem: str) -> None:
    with pytest.raises(ChunkIndexError) as err:
        parse_index(raw)
    assert problem in str(err.value)


def test_bundle_create_indexes_a_root_and_checks_the_name(
    tmp_path: Path, releases: dict, keypair: tuple[str, str]
) -> None:
    index = json.loads(_index_of(releases["new"]))
    assert sorted(index["files"]) == ["initramfs", "kernel", "rootfs.squashfs"]
    files = _payload(tmp_path / "named", b"x")
    files[CHUNKS_NAME] = files["kernel"]
    from basalt.machinery.images import BundleInputError

    with pytest.raises(BundleInputError) as err:
        create_bundle(
            tmp_path / "x.tar", files, "0.3.0", "default", "x86_64", load_signing_key(keypair[0])
        )
    assert "chunk index" in str(err.value)
    assert not (tmp_path / "x.tar").exists()


def test_a_held_chunk_that_cannot_be_read_is_refused_naming_the_file(
    tmp_path: Path, releases: dict, trusted: list[VerificationKey]
) -> None:
    index = _index_of(releases["old"])
    upload = delta_upload(releases["new"], index)
    assert upload is not None
    root = releases["old_files"]["rootfs.squashfs"]
    root.write_bytes(root.read_bytes()[:500_000])  # the running root is shorter than it says
    with _held(releases["old_files"], index) as held, pytest.raises(ImagePayloadError) as err:
        _assemble(tmp_path, upload.pieces(), trusted, held)
    assert "rootfs.squashfs" in str(err.value)
    assert "could not be copied from the running image" in str(err.value)


def test_a_held_hash_of_another_size_is_not_taken_for_the_chunk(releases: dict) -> None:
    """An index that pairs a chunk's sha256 with another size (an inconsistent build) does
    not make the node copy a run of the wrong length: that chunk is sent."""
    raw = json.loads(_index_of(releases["old"]))
    raw["files"]["kernel"] = [[size + 1, sha] for size, sha in raw["files"]["kernel"]]
    odd = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    upload = delta_upload(releases["new"], odd)
    assert upload is not None
    assert all(p.sent for p in upload.parts if p.path == "kernel")
