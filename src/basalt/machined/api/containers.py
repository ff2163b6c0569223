"""The container RPCs of MachineService (a mixin of MachineServicer): ImageImport,
ImageList and ContainerRun, on the node's containerd in namespace ``basalt``.

``ImageImport`` is client-streaming, so it is never forwarded: clients dial the node.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from basalt.machinery.api import common_pb2, machine_pb2

from .errors import InvalidRequestError, NotFoundError, UnavailableError

if TYPE_CHECKING:
    from ..containerd.runtime import ContainerRuntime
    from ..node import Node

Context = grpc.aio.ServicerContext[Any, Any]
MAX_IMAGE_BYTES = 4 * 1024 * 1024 * 1024
DEFAULT_RUN_TIMEOUT = 60
MAX_RUN_TIMEOUT = 24 * 3600
UPLOAD_DIR = Path("lib") / "basalt" / "image-imports"


class ContainerMethods:
    node: Node

    def meta(self) -> common_pb2.Metadata:
        raise NotImplementedError

    def _runtime(self) -> ContainerRuntime:
        from ..containerd.runtime import ContainerdUnavailable, runtime_for

        runtime = runtime_for(self.node)
        try:
            runtime.require_running()
        except ContainerdUnavailable as exc:
            raise UnavailableError(str(exc)) from None
        return runtime

    async def _containerd(self, coro: Any) -> Any:
        try:
            return await coro
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(f"containerd: {exc.code().name}: {exc.details()}") from None

    async def ImageImport(
        self, requests: AsyncIterator[machine_pb2.ImageImportRequest], context: Context
    ) -> Any:
        from ..containerd.archive import ArchiveError

        runtime = self._runtime()  # refuse before receiving anything
        name, path = await self._receive(requests)
        try:
            try:
                name, digest = await self._containerd(runtime.import_archive(path, name))
            except ArchiveError as exc:
                raise InvalidRequestError(
                    f"image archive refused, nothing imported: {exc}",
                    hint="send an OCI image layout tar or a docker-archive tar",
                ) from None
        finally:
            path.unlink(missing_ok=True)
        answer = machine_pb2.ImageImport(metadata=self.meta(), name=name, digest=digest)
        return machine_pb2.ImageImportResponse(messages=[answer])

    async def _receive(
        self, requests: AsyncIterator[machine_pb2.ImageImportRequest]
    ) -> tuple[str, Path]:
        directory = self.node.paths.ephemeral / UPLOAD_DIR
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="image-", suffix=".tar", dir=directory)
        path = Path(name)
        image_name = ""
        total = 0
        first = True
        try:
            with os.fdopen(fd, "wb") as out:
                async for request in requests:
                    part = request.WhichOneof("part")
                    if part == "options":
                        if not first:
                            raise InvalidRequestError(
                                "options may only come first in an ImageImport stream"
                            )
                        image_name = request.options.name
                    elif part == "data":
                        total += len(request.data)
                        if total > MAX_IMAGE_BYTES:
                            raise InvalidRequestError(
                                f"the image archive is larger than {MAX_IMAGE_BYTES} bytes; "
                                "refused while uploading"
                            )
                        await asyncio.to_thread(out.write, request.data)
                    first = False
            if total == 0:
                raise InvalidRequestError(
                    "no image archive data was sent",
                    hint="basaltctl containers import IMAGE.tar",
                )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return image_name, path

    async def ImageList(self, request: common_pb2.Empty, context: Context) -> Any:
        images = await self._containerd(self._runtime().list_images())
        found = [
            machine_pb2.ImageInfo(
                name=i.name,
                digest=i.digest,
                media_type=i.media_type,
                size=i.size,
                created=i.created,
            )
            for i in images
        ]
        return machine_pb2.ImageListResponse(
            messages=[machine_pb2.ImageList(metadata=self.meta(), images=found)]
        )

    async def ContainerRun(self, request: machine_pb2.ContainerRunRequest, context: Context) -> Any:
        if not request.image:
            raise InvalidRequestError("no image given", hint="basaltctl containers images")
        timeout = request.timeout_seconds or DEFAULT_RUN_TIMEOUT
        if timeout > MAX_RUN_TIMEOUT:
            raise InvalidRequestError(f"timeout {timeout}s is longer than {MAX_RUN_TIMEOUT}s")
        runtime = self._runtime()
        try:
            result = await self._containerd(
                runtime.run(request.image, list(request.args), list(request.env), float(timeout))
            )
        except LookupError as exc:
            raise NotFoundError(str(exc.args[0]), hint="basaltctl containers images") from None
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        answer = machine_pb2.ContainerRun(
            metadata=self.meta(),
            id=result.container_id,
            exit_code=result.exit_code,
            log_id=result.log_id,
            timed_out=result.timed_out,
        )
        return machine_pb2.ContainerRunResponse(messages=[answer])
