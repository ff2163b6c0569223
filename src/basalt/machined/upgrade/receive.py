"""Receiving a bundle: streamed into EPHEMERAL and verified on the way in, bounded; or a
file on the node verified as a whole (a staged bundle)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .jobs import MAX_BUNDLE_BYTES, UPLOAD_DIR, BundleUploadError

if TYPE_CHECKING:
    from basalt.machinery.images import VerificationKey, VerifiedBundle
    from basalt.machinery.images.delta import Held

    from ..chunk_pipe import ChunkPipe
    from ..node import Node

log = logging.getLogger(__name__)

#: Where the running slot holds each chunk, for as long as the block lasts.
Holding = Callable[[], contextlib.AbstractContextManager["Held"]]


async def receive_bundle(
    node: Node,
    chunks: AsyncIterator[bytes],
    keys: list[VerificationKey],
    label: str = "uploaded bundle",
    limit: int = MAX_BUNDLE_BYTES,
    holding: Holding | None = None,
) -> tuple[Path, VerifiedBundle]:
    """Stream an upload (or a download) into a temp file in EPHEMERAL, verifying it on
    the way in against ``keys``: a thread checks and hashes what arrived while the next
    chunks come (:func:`~basalt.machinery.images.verify_tar_stream`). Refused as soon as
    a check fails or the bundle passes ``limit``; the temp file is removed then.

    With ``holding`` the upload is a delta stream (docs/adr/0026): the thread writes the
    bundle from the chunks sent and the ones ``holding()`` says where the node holds
    (:func:`~basalt.machinery.images.delta.assemble`), and ``limit`` bounds the bundle
    the manifest describes as well as what is sent."""
    from basalt.machinery.images import required_payload, verify_tar_stream
    from basalt.machinery.images.delta import assemble

    from ..chunk_pipe import ChunkPipe

    directory = node.paths.ephemeral / UPLOAD_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    platform = node.platform
    required = required_payload(platform.mode.value)
    import tempfile  # an upload's: not the start-up's (it brings shutil, random, bz2...)

    fd, name = tempfile.mkstemp(prefix="bundle-", suffix=".tar", dir=directory)
    path = Path(name)
    pipe = ChunkPipe()
    timing = _ReceiveTiming()

    def verify(out: IO[bytes]) -> VerifiedBundle:
        begun = time.thread_time()  # a pool thread: its clock counts its earlier work
        try:
            if holding is None:
                return verify_tar_stream(
                    pipe, out, path, keys, platform.arch, required=required, label=label
                )
            with holding() as held:
                verified = assemble(
                    pipe, out.fileno(), path, keys, platform.arch, held,
                    required=required, label=label, limit=limit,
                )  # fmt: skip
            timing.assembled = os.fstat(out.fileno()).st_size
            return verified
        finally:
            timing.verifier_cpu = time.thread_time() - begun
            pipe.stop()

    try:
        with os.fdopen(fd, "wb") as out:
            verifying = asyncio.ensure_future(asyncio.to_thread(verify, out))
            try:
                timing.size = await _send(chunks, pipe, limit, timing)
            except BaseException as exc:
                await pipe.abort(str(exc) or type(exc).__name__)
                with contextlib.suppress(BaseException):
                    await verifying
                raise
            verified = await verifying
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    log.info("received %s: %s", label, timing.done())
    return path, verified


async def verify_file(
    node: Node, path: Path, keys: list[VerificationKey], label: str
) -> VerifiedBundle:
    """verify_bundle against ``keys`` and this node's architecture and platform."""
    from basalt.machinery.images import required_payload, verify_bundle

    platform = node.platform
    return await asyncio.to_thread(
        verify_bundle,
        path,
        keys,
        platform.arch,
        required=required_payload(platform.mode.value),
        label=label,
    )


@dataclass
class _ReceiveTiming:
    """Where the time of one receive went, for the log line that ends it."""

    started: float = field(default_factory=time.monotonic)
    cpu_started: float = field(default_factory=time.process_time)
    first: float | None = None
    last: float | None = None
    size: int = 0
    verifier_cpu: float = 0.0
    #: A delta upload: the size of the bundle written from it.
    assembled: int | None = None

    def done(self) -> str:
        now = time.monotonic()
        first = self.first if self.first is not None else now
        last = self.last if self.last is not None else now
        streaming = last - first
        rate = self.size / streaming / 1e6 if streaming > 0 else 0.0
        cpu = time.process_time() - self.cpu_started
        delta = (
            ""
            if self.assembled is None
            else f" (a delta: a {self.assembled / 1e6:.1f} MB bundle written from it and "
            "the running slot)"
        )
        return (
            f"{self.size / 1e6:.1f} MB{delta} in {streaming:.1f} s ({rate:.1f} MB/s) after "
            f"{first - self.started:.1f} s waiting for the first bytes; verified and "
            f"flushed {now - last:.1f} s after the last; CPU {cpu:.1f} s (verifying thread "
            f"{self.verifier_cpu:.1f} s)"
        )


async def _send(
    chunks: AsyncIterator[bytes], pipe: ChunkPipe, limit: int, timing: _ReceiveTiming
) -> int:
    """Hand the chunks to the verifying thread until the end, or until it stops (it
    failed: its own error says why); the bytes handed. BundleUploadError when there is
    nothing, or too much."""
    total = 0
    async for chunk in chunks:
        if timing.first is None:
            timing.first = time.monotonic()
        total += len(chunk)
        if total > limit:
            raise BundleUploadError(
                f"the bundle is larger than {limit} bytes; refused while uploading",
                hint="container bundles hold the Basalt source tree: a few MiB",
            )
        if not await pipe.put(chunk):
            return total
    timing.last = time.monotonic()
    if total == 0:
        raise BundleUploadError("no bundle data was sent", hint="give --image BUNDLE.tar")
    await pipe.close()
    return total
