"""The ``containerd`` service: containerd with a config machined writes, healthy when its
socket answers Version (and, with the CRI plugin on, the CRI's Version too)."""

from __future__ import annotations

import asyncio
import shutil
from typing import TYPE_CHECKING

from ..services import HealthCheck, ProcessRunner, RestartPolicy, ServiceSpec
from .client import ContainerdClient
from .config import SEARCH_PATH
from .runtime import SERVICE_ID, paths_for

if TYPE_CHECKING:
    from ..node import Node


def containerd_binary() -> str | None:
    return shutil.which("containerd", path=SEARCH_PATH)


def containerd_service(node: Node) -> ServiceSpec:
    paths = paths_for(node)
    binary = containerd_binary()

    async def prepare() -> None:
        await asyncio.to_thread(paths.write)

    async def healthy() -> None:
        import grpc.aio

        async with ContainerdClient(paths.socket, timeout=2.0) as client:
            try:
                await client.server_version()
            except grpc.aio.AioRpcError as exc:
                raise RuntimeError(
                    f"containerd Version: {exc.code().name}: {exc.details()}"
                ) from None
            if paths.cri:
                try:
                    await client.cri_version()
                except grpc.aio.AioRpcError as exc:
                    raise RuntimeError(
                        f"CRI Version on {paths.socket}: {exc.code().name}: {exc.details()}"
                    ) from None

    return ServiceSpec(
        id=SERVICE_ID,
        runner=ProcessRunner(
            [binary or "containerd", "--config", str(paths.config)],
            env={
                "PATH": SEARCH_PATH,
                "HOME": "/root"
                if not node.platform.mode.in_container
                else str(node.paths.ephemeral),
            },
            stop_timeout=10.0,
        ),
        prepare=prepare,
        health_check=HealthCheck(healthy, interval=5.0, timeout=3.0, initial_delay=0.3),
        restart=RestartPolicy.ALWAYS,
        backoff_initial=1.0,
        backoff_max=15.0,
        skip_reason=lambda: None if binary else "containerd binary not in image",
    )
