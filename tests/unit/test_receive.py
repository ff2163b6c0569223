"""Receiving an upgrade bundle: verified while it arrives (``Upgrader.receive``).

The node hashes and checks each chunk in a thread while the next one arrives, so a bad
manifest or signature stops the upload at its first chunks, and a good bundle is ready
to write once the last chunk is in. Whatever fails, nothing is left in EPHEMERAL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tarfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from basalt.machined.assemble import build_node
from basalt.machined.chunk_pipe import ChunkPipe, PipeAborted
from basalt.machined.node import Node, Tuning
from basalt.machined.platform import NodePaths, Platform, PlatformMode
from basalt.machined.upgrade import UPLOAD_DIR, BundleUploadError
from basalt.machinery.config import bundle_from_raw
from basalt.machinery.images import (
    BASALT_TREE,
    ImagePayloadError,
    UnknownSigningKeyError,
    create_bundle,
    generate_signing_key,
    load_signing_key,
)
from basalt.machinery.images._stream import FileSeal

CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def keypair() -> tuple[str, str]:
    return generate_signing_key()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[str, str]) -> bytes:
    """A signed container bundle of about 4 MiB."""
    work = tmp_path_factory.mktemp("bundle")
    tree = work / BASALT_TREE
    tree.write_bytes(os.urandom(4 << 20))
    out = work / "bundle.tar"
    key = load_signing_key(keypair[0])
    create_bundle(out, {BASALT_TREE: tree}, "0.2.0", "default", "x86_64", key)
    return out.read_bytes()


def _trusting(public_pem: str) -> object:
    document = {
        "apiVersion": "basalt.dev/v1alpha1",
        "kind": "ImageVerificationConfig",
        "keys": [{"name": "release", "publicKey": public_pem}],
    }
    return bundle_from_raw([document])


@asynccontextmanager
async def node_at(root: Path, trusted_pem: str) -> AsyncIterator[Node]:
    platform = Platform(PlatformMode.CONTAINER, NodePaths.under(root), "127.0.0.211", "n1")
    node = build_node(platform, Tuning())
    node.paths.create()
    node.config = _trusting(trusted_pem)  # type: ignore[assignment]
    try:
        yield node
    finally:
        await node.stop_background()


class Sender:
    """The upload's chunks, counting what was taken from it."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self.data = data
        self.fail_at = fail_at
        self.sent = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), CHUNK):
            if self.fail_at is not None and start >= self.fail_at:
                raise ConnectionResetError("the client went away")
            self.sent = start + CHUNK
            yield self.data[start : start + CHUNK]


def uploads(root: Path) -> list[str]:
    directory = NodePaths.under(root).ephemeral / UPLOAD_DIR
    return sorted(os.listdir(directory)) if directory.exists() else []


def test_a_good_bundle_is_verified_as_it_arrives(
    tmp_path: Path, keypair: tuple[str, str], bundle: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="basalt.machined.upgrade")

    async def run() -> None:
        async with node_at(tmp_path, keypair[1]) as node:
            path, verified = await node.upgrader.receive(Sender(bundle).chunks())
            assert path.read_bytes() == bundle
            assert verified.source == path and verified.version == "0.2.0"
            assert verified.layout is not None
            with open(path, "rb") as handle:
                assert verified.layout.seal == FileSeal.of(handle.fileno())
            with tarfile.open(path) as tar:
                found = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
            extents = verified.layout.extents
            assert {n: (e.offset, e.size) for n, e in extents.items()} == found
            node.upgrader.check_trust(verified, "uploaded bundle")

    asyncio.run(run())
    assert len(uploads(tmp_path)) == 1
    # The node says how fast the bundle came and where the time went.
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("received")]
    assert len(said) == 1, caplog.text
    assert said[0].startswith(f"received uploaded bundle: {len(bundle) / 1e6:.1f} MB in ")
    assert "MB/s" in said[0] and "verifying thread" in said[0]
    total, thread = map(
        float, re.findall(r"CPU ([0-9.]+) s \(verifying thread ([0-9.]+) s", said[0])[0]
    )
    assert thread <= total + 0.05  # the thread's own share, not its pool thread's lifetime


def test_an_unknown_key_stops_the_upload_at_its_first_chunks(
    tmp_path: Path, keypair: tuple[str, str], bundle: bytes
) -> None:
    _, other_public = generate_signing_key()
    sender = Sender(bundle)

    async def run() -> None:
        async with node_at(tmp_path, other_public) as node:
            await node.upgrader.receive(sender.chunks())

    with pytest.raises(UnknownSigningKeyError):
        asyncio.run(run())
    assert sender.sent <= 1 << 20, f"{sender.sent} of {len(bundle)} bytes were sent"
    assert uploads(tmp_path) == []


def test_a_tampered_payload_is_refused_and_nothing_is_kept(
    tmp_path: Path, keypair: tuple[str, str], bundle: bytes
) -> None:
    data = bytearray(bundle)
    data[len(data) // 2] ^= 1

    async def run() -> None:
        async with node_at(tmp_path, keypair[1]) as node:
            await node.upgrader.receive(Sender(bytes(data)).chunks())

    with pytest.raises(ImagePayloadError, match="tampered"):
        asyncio.run(run())
    assert uploads(tmp_path) == []


@pytest.mark.parametrize(
    ("size", "limit", "message"),
    [
        (0, 1 << 30, "no bundle data was sent"),
        (None, 2 << 20, "larger than 2097152 bytes; refused while uploading"),
    ],
)
def test_an_empty_or_oversized_upload_is_refused(
    tmp_path: Path, keypair: tuple[str, str], bundle: bytes, size: int | None, limit: int, message
) -> None:
    async def run() -> None:
        async with node_at(tmp_path, keypair[1]) as node:
            await node.upgrader.receive(Sender(bundle[:size]).chunks(), limit=limit)

    with pytest.raises(BundleUploadError, match=message):
        asyncio.run(run())
    assert uploads(tmp_path) == []


def test_an_upload_cut_short_ends_the_verifier_and_keeps_nothing(
    tmp_path: Path, keypair: tuple[str, str], bundle: bytes
) -> None:
    before = threading.active_count()

    async def run() -> None:
        async with node_at(tmp_path, keypair[1]) as node:
            await node.upgrader.receive(Sender(bundle, fail_at=len(bundle) // 2).chunks())

    with pytest.raises(ConnectionResetError):
        asyncio.run(run())
    assert uploads(tmp_path) == []
    assert threading.active_count() <= before  # asyncio.run joined the verifier's thread


def test_a_key_no_longer_trusted_when_the_sequence_runs_is_refused(
    tmp_path: Path, keypair: tuple[str, str], bundle: bytes
) -> None:
    _, other_public = generate_signing_key()

    async def run() -> None:
        async with node_at(tmp_path, keypair[1]) as node:
            _, verified = await node.upgrader.receive(Sender(bundle).chunks())
            node.config = _trusting(other_public)  # type: ignore[assignment]
            node.upgrader.check_trust(verified, "uploaded bundle")

    with pytest.raises(UnknownSigningKeyError, match="uploaded bundle"):
        asyncio.run(run())


# -- the pipe between the event loop and the verifying thread -------------------------------------


def test_the_pipe_holds_back_the_sender_until_the_reader_reads() -> None:
    async def run() -> tuple[bool, bytes]:
        pipe = ChunkPipe(depth=2)
        assert await pipe.put(b"a" * 150) and await pipe.put(b"b" * 50)
        third = asyncio.ensure_future(pipe.put(b"c"))
        await asyncio.sleep(0.05)
        blocked = not third.done()
        got: list[bytes] = []

        def read() -> None:
            try:
                while data := pipe.read(100):
                    got.append(data)
            finally:
                pipe.stop()

        reading = asyncio.ensure_future(asyncio.to_thread(read))
        assert await third
        assert await pipe.close()
        await reading
        return blocked, b"".join(got)

    blocked, got = asyncio.run(run())
    assert blocked
    assert got == b"a" * 150 + b"b" * 50 + b"c"


def test_the_pipe_hands_on_a_whole_chunk_without_copying_it_and_splits_the_others() -> None:
    first, second = b"a" * 300, b"b" * 100

    async def run() -> list[bytes]:
        pipe = ChunkPipe()
        for chunk in (first, second):
            assert await pipe.put(chunk)
        assert await pipe.close()
        got = [pipe.read(1000), pipe.read(40), pipe.read(1000), pipe.read(1000)]
        pipe.stop()
        return got

    whole, part, rest, end = asyncio.run(run())
    assert whole is first  # a read of at least a chunk takes the very object sent
    assert (part, rest, end) == (b"b" * 40, b"b" * 60, b"")


def test_a_stopped_reader_releases_the_sender_and_an_abort_reaches_the_reader() -> None:
    async def run() -> None:
        pipe = ChunkPipe(depth=1)
        assert await pipe.put(b"x")
        waiting = asyncio.ensure_future(pipe.put(b"y"))
        await asyncio.sleep(0.02)
        assert not waiting.done()
        await asyncio.to_thread(pipe.stop)  # the reader gave up without reading
        assert await waiting is False

        pipe = ChunkPipe()
        await pipe.abort("the client went away")
        with pytest.raises(PipeAborted, match="the client went away"):
            await asyncio.to_thread(pipe.read, 10)

    asyncio.run(run())
