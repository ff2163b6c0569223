"""What the API does with containerd: import images, list them, run a container to
completion with its output in a log the node's Logs RPC serves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf import any_pb2

from basalt.machinery.api.containerd import (
    containers_pb2,
    content_pb2,
    diff_pb2,
    images_pb2,
    snapshots_pb2,
    tasks_pb2,
    types_pb2,
)

from ..services import LogBuffer
from . import archive
from .client import ContainerdClient
from .config import ENABLE_ENV, ContainerdPaths
from .spec import SPEC_TYPE_URL, command, environment, runtime_spec

if TYPE_CHECKING:
    from ..node import Node

SERVICE_ID = "containerd"
LOG_PREFIX = "containers/"
KEEP_LOGS = 64
RUNTIME = "io.containerd.runc.v2"
#: Each node's one runtime, made on first use and gone with its node.
_RUNTIMES: weakref.WeakKeyDictionary[Node, ContainerRuntime] = weakref.WeakKeyDictionary()


class ContainerdUnavailable(RuntimeError):
    """containerd does not run on this node (or not now); the message says why."""


@dataclass(frozen=True)
class ImageSummary:
    name: str
    digest: str
    media_type: str
    size: int
    created: int


@dataclass(frozen=True)
class RunResult:
    container_id: str
    log_id: str
    exit_code: int
    timed_out: bool


def wanted(node: Node) -> bool:
    """Metal runs containerd always; a process node only when its environment asks."""
    return not node.platform.mode.in_container or bool(os.environ.get(ENABLE_ENV))


def paths_for(node: Node) -> ContainerdPaths:
    if node.platform.mode.in_container:
        return ContainerdPaths.under(node.paths.ephemeral)
    return ContainerdPaths.metal(node.platform.system_root, node.paths.ephemeral)


def runtime_for(node: Node) -> ContainerRuntime:
    """The node's one :class:`ContainerRuntime` (made on first use)."""
    found = _RUNTIMES.get(node)
    if found is None:
        found = _RUNTIMES[node] = ContainerRuntime(node)
    return found


class ContainerRuntime:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.paths = paths_for(node)
        self.logs: OrderedDict[str, LogBuffer] = OrderedDict()
        self._imports = asyncio.Lock()

    # -- access -----------------------------------------------------------------------------
    def client(self, timeout: float = 30.0) -> ContainerdClient:
        self.require_running()
        return ContainerdClient(self.paths.socket, timeout=timeout)

    def require_running(self) -> None:
        statuses = {s.id: s for s in self.node.supervisor.statuses()}
        status = statuses.get(SERVICE_ID)
        if status is None:
            raise ContainerdUnavailable(
                "containerd does not run on this node"
                + (
                    f" (set {ENABLE_ENV}=1 for machined on a process node)"
                    if self.node.platform.mode.in_container
                    else ""
                )
            )
        if str(status.state) != "running":
            raise ContainerdUnavailable(
                f"containerd is {status.state}"
                + (f": {status.message}" if status.message else "")
                + "; see `basaltctl logs containerd`"
            )

    def log(self, log_id: str) -> LogBuffer | None:
        return self.logs.get(log_id)

    # -- images -----------------------------------------------------------------------------
    async def import_archive(self, tar: Path, name: str = "") -> tuple[str, str]:
        """Import the image tar at ``tar``; returns (name, manifest digest).

        The archive is checked completely first (:mod:`.archive`); content and snapshots
        are written under a lease, and the image record is created last, so a failure
        leaves no image behind.
        """
        self.require_running()
        workdir = tar.with_name(tar.name + ".blobs")
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(
            self.node.platform.arch, self.node.platform.arch
        )
        try:
            image = await asyncio.to_thread(archive.parse, tar, workdir, name=name, arch=arch)
            async with self._imports, self.client(timeout=60.0) as client, client.leased():
                await self._write_and_unpack(client, image)
                record = images_pb2.Image(
                    name=image.name,
                    target=types_pb2.Descriptor(
                        media_type=image.manifest.media_type,
                        digest=image.manifest.digest,
                        size=image.manifest.size,
                    ),
                )
                try:
                    await client.call(
                        client.images.Create, images_pb2.CreateImageRequest(image=record)
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise
                    await client.call(
                        client.images.Update, images_pb2.UpdateImageRequest(image=record)
                    )
            return image.name, image.manifest.digest
        finally:
            await asyncio.to_thread(archive.cleanup, workdir)

    async def _write_and_unpack(self, client: ContainerdClient, image: archive.ParsedImage) -> None:
        chain = archive.chain_ids(image.diff_ids)
        snapshotter = self.paths.snapshotter
        for layer in {layer.digest: layer for layer in image.layers}.values():  # each once
            await client.write_content(layer.path, layer.digest, layer.size)
        await client.write_content(
            image.config.path,
            image.config.digest,
            image.config.size,
            labels={f"containerd.io/gc.ref.snapshot.{snapshotter}": chain[-1]},
        )
        await client.write_content(
            image.manifest.path,
            image.manifest.digest,
            image.manifest.size,
            labels=image.manifest_labels,
        )
        parent = ""
        for i, (layer, chain_id) in enumerate(zip(image.layers, chain, strict=True)):
            if await self._snapshot_exists(client, chain_id):
                parent = chain_id
                continue
            key = f"basalt-extract-{uuid.uuid4().hex} {chain_id}"
            prepared = await client.call(
                client.snapshots.Prepare,
                snapshots_pb2.PrepareSnapshotRequest(
                    snapshotter=snapshotter, key=key, parent=parent
                ),
            )
            try:
                applied = await client.call(
                    client.diff.Apply,
                    diff_pb2.ApplyRequest(
                        diff=types_pb2.Descriptor(
                            media_type=layer.media_type, digest=layer.digest, size=layer.size
                        ),
                        mounts=list(prepared.mounts),
                    ),
                    timeout=300.0,
                )
                if applied.applied.digest != image.diff_ids[i]:
                    raise archive.ArchiveError(
                        f"layer {i}: unpacks to {applied.applied.digest}, the image config "
                        f"says {image.diff_ids[i]}"
                    )
                await client.call(
                    client.snapshots.Commit,
                    snapshots_pb2.CommitSnapshotRequest(
                        snapshotter=snapshotter,
                        name=chain_id,
                        key=key,
                        labels={"containerd.io/snapshot.ref": chain_id},
                    ),
                )
            except BaseException:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await client.call(
                        client.snapshots.Remove,
                        snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                    )
                raise
            parent = chain_id

    async def _snapshot_exists(self, client: ContainerdClient, key: str) -> bool:
        try:
            await client.call(
                client.snapshots.Stat,
                snapshots_pb2.StatSnapshotRequest(snapshotter=self.paths.snapshotter, key=key),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def list_images(self) -> list[ImageSummary]:
        async with self.client() as client:
            answer = await client.call(client.images.List, images_pb2.ListImagesRequest())
        return sorted(
            (
                ImageSummary(
                    name=i.name,
                    digest=i.target.digest,
                    media_type=i.target.media_type,
                    size=i.target.size,
                    created=i.created_at.seconds,
                )
                for i in answer.images
            ),
            key=lambda s: s.name,
        )

    async def _read_json(self, client: ContainerdClient, digest: str) -> Any:
        chunks = []
        call = client.content.Read(
            content_pb2.ReadContentRequest(digest=digest),
            metadata=client.metadata,
            timeout=client.timeout,
        )
        async for piece in call:
            chunks.append(piece.data)
        return json.loads(b"".join(chunks))

    async def _resolve(self, client: ContainerdClient, ref: str) -> tuple[str, dict[str, Any], str]:
        """(image name, image config, top chain id) of an imported image."""
        names = [ref] if ":" in ref.rsplit("/", 1)[-1] or "@" in ref else [ref, f"{ref}:latest"]
        image = None
        for name in names:
            try:
                image = (
                    await client.call(client.images.Get, images_pb2.GetImageRequest(name=name))
                ).image
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        if image is None:
            raise LookupError(f"image {ref!r} is not on this node: import it first")
        descriptor = {"mediaType": image.target.media_type, "digest": image.target.digest}
        while descriptor.get("mediaType") in archive.INDEX_TYPES:
            index = await self._read_json(client, descriptor["digest"])
            descriptor = index["manifests"][0]
        manifest = await self._read_json(client, descriptor["digest"])
        config = await self._read_json(client, manifest["config"]["digest"])
        chain = archive.chain_ids(list(config["rootfs"]["diff_ids"]))
        if not await self._snapshot_exists(client, chain[-1]):
            raise LookupError(
                f"image {image.name!r} is not unpacked for the {self.paths.snapshotter} "
                "snapshotter: import it again"
            )
        return image.name, config, chain[-1]

    # -- running ----------------------------------------------------------------------------
    def _new_log(self, log_id: str) -> LogBuffer:
        buffer = LogBuffer(max_lines=5000)
        self.logs[log_id] = buffer
        while len(self.logs) > KEEP_LOGS:
            _, old = self.logs.popitem(last=False)
            old.close()
        return buffer

    async def run(self, ref: str, args: list[str], env: list[str], timeout: float) -> RunResult:
        """Run ``ref`` to completion in the ``basalt`` namespace; its output goes to the
        log ``containers/<id>``. A run longer than ``timeout`` seconds is killed."""
        container_id = f"run-{uuid.uuid4().hex[:12]}"
        log_id = LOG_PREFIX + container_id
        snapshotter = self.paths.snapshotter
        async with self.client() as client:
            name, config, chain_id = await self._resolve(client, ref)
            settings = config.get("config") or {}
            spec = runtime_spec(
                container_id,
                command(config, args),
                environment(config, env),
                cwd=str(settings.get("WorkingDir") or "/"),
            )
            log = self._new_log(log_id)
            out = self.paths.logs / f"{container_id}.out"
            err = self.paths.logs / f"{container_id}.err"
            self.paths.logs.mkdir(parents=True, exist_ok=True)
            created: list[str] = []
            timed_out = False
            try:
                # Under a lease until the container refers to the new snapshot: the
                # garbage collector (set off by an earlier run's removal) may not take
                # an active snapshot that nothing references yet.
                async with client.leased():
                    prepared = await client.call(
                        client.snapshots.Prepare,
                        snapshots_pb2.PrepareSnapshotRequest(
                            snapshotter=snapshotter, key=container_id, parent=chain_id
                        ),
                    )
                    created.append("snapshot")
                    await client.call(
                        client.containers.Create,
                        containers_pb2.CreateContainerRequest(
                            container=containers_pb2.Container(
                                id=container_id,
                                image=name,
                                labels={"io.basalt.run": "api"},
                                runtime=containers_pb2.Container.Runtime(name=RUNTIME),
                                spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=spec),
                                snapshotter=snapshotter,
                                snapshot_key=container_id,
                            )
                        ),
                    )
                    created.append("container")
                await client.call(
                    client.tasks.Create,
                    tasks_pb2.CreateTaskRequest(
                        container_id=container_id,
                        rootfs=list(prepared.mounts),
                        stdout=out.as_uri(),
                        stderr=err.as_uri(),
                    ),
                    timeout=60.0,
                )
                created.append("task")
                code, timed_out = await self._start_and_wait(client, container_id, timeout, log)
            finally:
                await self._cleanup(client, container_id, created)
                _feed(log, out, err)
                if timed_out:
                    log.append(f"[basalt: killed after {timeout:g}s]".encode())
                log.close()
                for path in (out, err):
                    path.unlink(missing_ok=True)
        return RunResult(container_id, log_id, code, timed_out)

    async def _start_and_wait(
        self, client: ContainerdClient, container_id: str, timeout: float, log: LogBuffer
    ) -> tuple[int, bool]:
        wait = asyncio.ensure_future(
            client.tasks.Wait(
                tasks_pb2.WaitRequest(container_id=container_id),
                metadata=client.metadata,
                timeout=timeout + 60.0,
            )
        )
        try:
            await asyncio.sleep(0)  # the Wait call is on its way before the task starts
            await client.call(client.tasks.Start, tasks_pb2.StartRequest(container_id=container_id))
            try:
                answer = await asyncio.wait_for(asyncio.shield(wait), timeout)
                return int(answer.exit_status), False
            except TimeoutError:
                await client.call(
                    client.tasks.Kill,
                    tasks_pb2.KillRequest(
                        container_id=container_id, signal=int(signal.SIGKILL), all=True
                    ),
                )
                answer = await asyncio.wait_for(wait, 30.0)
                return int(answer.exit_status), True
        finally:
            if not wait.done():
                wait.cancel()

    async def _cleanup(
        self, client: ContainerdClient, container_id: str, created: list[str]
    ) -> None:
        steps = {
            "task": (client.tasks.Delete, tasks_pb2.DeleteTaskRequest(container_id=container_id)),
            "container": (
                client.containers.Delete,
                containers_pb2.DeleteContainerRequest(id=container_id),
            ),
            "snapshot": (
                client.snapshots.Remove,
                snapshots_pb2.RemoveSnapshotRequest(
                    snapshotter=self.paths.snapshotter, key=container_id
                ),
            ),
        }
        for what in reversed(created):
            method, request = steps[what]
            if what == "task":
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await client.call(
                        client.tasks.Kill,
                        tasks_pb2.KillRequest(
                            container_id=container_id, signal=int(signal.SIGKILL), all=True
                        ),
                    )
            with contextlib.suppress(grpc.aio.AioRpcError):
                await client.call(method, request)


def _feed(log: LogBuffer, *paths: Path) -> None:
    """stdout's lines, then stderr's, into the run's log."""
    from ..services import LineSplitter

    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        lines = LineSplitter(log)
        lines.feed(data)
        lines.flush()
