"""A small async containerd client over our proto subset (unix socket, no TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from google.protobuf import empty_pb2

from basalt.machinery.api.containerd import (
    containers_pb2_grpc,
    content_pb2,
    content_pb2_grpc,
    cri_pb2,
    cri_pb2_grpc,
    diff_pb2_grpc,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    snapshots_pb2_grpc,
    tasks_pb2_grpc,
    version_pb2_grpc,
)

#: The namespace of everything the API runs (the CRI's is ``k8s.io``).
NAMESPACE = "basalt"
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"

WRITE_CHUNK = 1024 * 1024

_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    # A fresh connection per client: with gRPC's global subchannel pool, a check that ran
    # before containerd made its socket leaves later channels waiting out a backoff.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class ContainerdClient:
    """One containerd socket in one namespace; ``timeout`` bounds unary calls."""

    def __init__(
        self, socket: Path | str, *, namespace: str = NAMESPACE, timeout: float = 30.0
    ) -> None:
        self.socket = str(socket)
        self.namespace = namespace
        self.timeout = timeout
        self.lease: str | None = None
        self.channel = grpc.aio.insecure_channel(f"unix://{self.socket}", options=_OPTIONS)
        self.version = version_pb2_grpc.VersionStub(self.channel)
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self.diff = diff_pb2_grpc.DiffStub(self.channel)
        self.containers = containers_pb2_grpc.ContainersStub(self.channel)
        self.tasks = tasks_pb2_grpc.TasksStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.cri = cri_pb2_grpc.RuntimeServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)

    async def __aenter__(self) -> ContainerdClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        meta: tuple[tuple[str, str], ...] = ((NAMESPACE_HEADER, self.namespace),)
        if self.lease:
            meta += ((LEASE_HEADER, self.lease),)
        return meta

    async def call(self, method: Any, request: Any, *, timeout: float | None = None) -> Any:
        """A unary call in this client's namespace (and lease, while one is held)."""
        return await method(request, metadata=self.metadata, timeout=timeout or self.timeout)

    async def server_version(self) -> str:
        answer = await self.version.Version(empty_pb2.Empty(), timeout=self.timeout)
        return str(answer.version)

    async def cri_version(self) -> str:
        answer = await self.cri.Version(cri_pb2.VersionRequest(version="v1"), timeout=self.timeout)
        return f"{answer.runtime_name} {answer.runtime_version} (CRI {answer.runtime_api_version})"

    @contextlib.asynccontextmanager
    async def leased(self) -> AsyncIterator[str]:
        """Hold a lease while the body writes content and snapshots; delete it afterwards
        (what nothing else references then goes to containerd's garbage collector)."""
        lease_id = f"basalt-{uuid.uuid4().hex}"
        await self.call(
            self.leases.Create,
            leases_pb2.CreateRequest(id=lease_id, labels={"containerd.io/gc.expire": _expiry()}),
        )
        self.lease = lease_id
        try:
            yield lease_id
        finally:
            self.lease = None
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.call(self.leases.Delete, leases_pb2.DeleteRequest(id=lease_id))

    async def has_content(self, digest: str) -> bool:
        try:
            await self.call(self.content.Info, content_pb2.InfoRequest(digest=digest))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def write_content(
        self,
        data: bytes | Path,
        digest: str,
        size: int,
        labels: dict[str, str] | None = None,
    ) -> None:
        """Write one blob (bytes, or a file read in chunks) and commit it as ``digest``.

        containerd checks size and digest on commit; an existing blob only gets its labels.
        """
        ref = f"basalt-{digest}-{uuid.uuid4().hex[:8]}"

        async def chunks() -> AsyncIterator[bytes]:
            if isinstance(data, bytes):
                for start in range(0, len(data), WRITE_CHUNK):
                    yield data[start : start + WRITE_CHUNK]
                return
            stream = await asyncio.to_thread(data.open, "rb")
            try:
                while chunk := await asyncio.to_thread(stream.read, WRITE_CHUNK):
                    yield chunk
            finally:
                stream.close()

        async def requests() -> AsyncIterator[content_pb2.WriteContentRequest]:
            yield content_pb2.WriteContentRequest(
                action=content_pb2.STAT, ref=ref, total=size, expected=digest
            )
            offset = 0
            async for chunk in chunks():
                yield content_pb2.WriteContentRequest(
                    action=content_pb2.WRITE, ref=ref, offset=offset, data=chunk
                )
                offset += len(chunk)
            yield content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT,
                ref=ref,
                offset=offset,
                total=size,
                expected=digest,
                labels=labels or {},
            )

        if await self.has_content(digest):
            return
        call = self.content.Write(requests(), metadata=self.metadata, timeout=self.timeout * 4)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # written meanwhile: fine
                raise


def _expiry(seconds: int = 3600) -> str:
    import datetime as dt

    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
