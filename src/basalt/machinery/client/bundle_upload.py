"""What an Upgrade call sends: the bundle whole, or a delta against the image the node runs.

:func:`plan_upload` asks the node for the chunk index of its running image (the
``UpgradeIndex`` RPC) and, when the bundle carries an index too, sends only the chunks
the node does not hold (:mod:`basalt.machinery.images.delta`; docs/adr/0026). A node
that keeps no index, or answers too old to know the RPC, gets the bundle whole.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from basalt.machinery.api import common_pb2, machine_pb2

if TYPE_CHECKING:
    from basalt.machinery.images.delta import DeltaUpload

#: The size of each data message of an upload.
UPLOAD_CHUNK = 256 * 1024


@dataclass(frozen=True)
class BundleUpload:
    """A bundle file and how it goes to one node."""

    bundle: Path
    delta: DeltaUpload | None = None
    #: The sha256 of the node's index the delta was made against.
    index_sha256: str = ""

    @property
    def bundle_size(self) -> int:
        return self.bundle.stat().st_size

    @property
    def size(self) -> int:
        """The bytes sent."""
        return self.delta.size if self.delta is not None else self.bundle_size

    def describe(self) -> str:
        if self.delta is None:
            return f"the whole bundle, {self.bundle_size / 1e6:.1f} MB"
        return (
            f"{self.size / 1e6:.1f} MB of the {self.bundle_size / 1e6:.1f} MB bundle (a delta: "
            "the node holds the rest in its running image)"
        )

    def pieces(self) -> Iterator[bytes]:
        if self.delta is not None:
            yield from self.delta.pieces()
            return
        with self.bundle.open("rb") as handle:
            while chunk := handle.read(UPLOAD_CHUNK):
                yield chunk

    async def requests(
        self, options: machine_pb2.UpgradeOptions, advance: Any = None
    ) -> AsyncIterator[machine_pb2.UpgradeRequest]:
        """The Upgrade stream: ``options`` (with the delta's index), then the data;
        ``advance(count)`` is called after each message."""
        first = machine_pb2.UpgradeOptions()
        first.CopyFrom(options)
        first.delta_index = self.index_sha256
        yield machine_pb2.UpgradeRequest(options=first)
        pieces = self.pieces()
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            yield machine_pb2.UpgradeRequest(data=piece)
            if advance is not None:
                advance(len(piece))


async def options_only(
    options: machine_pb2.UpgradeOptions,
) -> AsyncIterator[machine_pb2.UpgradeRequest]:
    """An Upgrade stream of the options alone: the node fetches the URL they name."""
    yield machine_pb2.UpgradeRequest(options=options)


async def plan_upload(
    stub: Any, bundle: Path, *, metadata: tuple[tuple[str, str], ...] = (), whole: bool = False
) -> BundleUpload:
    """How ``bundle`` goes to the node behind ``stub`` (a MachineService stub): a delta
    when the node has an index and the bundle one too, else whole (``whole``: always).
    Errors other than "cannot" (authentication, roles) are raised."""
    if whole:
        return BundleUpload(bundle)
    try:
        answer = await stub.UpgradeIndex(common_pb2.Empty(), metadata=metadata, timeout=60)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION):
            return BundleUpload(bundle)
        raise
    index = answer.messages[0].index if answer.messages else b""
    if not index:
        return BundleUpload(bundle)
    from basalt.machinery.images.delta import delta_upload

    delta = await asyncio.to_thread(delta_upload, bundle, index)
    if delta is None:
        return BundleUpload(bundle)
    return BundleUpload(bundle, delta, hashlib.sha256(index).hexdigest())
