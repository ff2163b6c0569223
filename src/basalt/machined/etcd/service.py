"""The ``etcd`` service spec (control planes only)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc.aio

from ..services import HealthCheck, RestartPolicy, ServiceSpec
from .manager import EtcdManager, EtcdRunner, EtcdStartable, etcd_binary

if TYPE_CHECKING:
    from ..node import Node

#: Until etcd first passes after a start (starting, or a learner catching up), a check
#: looks again every STARTING_STEP for up to STARTING_PATIENCE before it fails: the node
#: is ready the moment etcd is, not up to a check interval later.
STARTING_PATIENCE = 1.5
STARTING_STEP = 0.1
INTERVAL = 1.0


def etcd_service(node: Node, manager: EtcdManager) -> ServiceSpec:
    async def check_once(timeout: float) -> None:
        async with manager.client(timeout=timeout) as client:
            status = await client.status()
        if status.errors:
            raise RuntimeError("; ".join(status.errors))
        if status.isLearner:
            raise RuntimeError("still a learner, catching up before promotion")

    async def healthy() -> None:
        if manager.healthy_since_start:
            await check_once(2.0)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTING_PATIENCE
        while True:
            try:
                await check_once(1.0)
            except (grpc.aio.AioRpcError, RuntimeError):
                if loop.time() + STARTING_STEP >= deadline:
                    raise
                await asyncio.sleep(STARTING_STEP)
            else:
                manager.healthy_since_start = True
                return

    return ServiceSpec(
        id="etcd",
        runner=EtcdRunner(manager),
        conditions=(EtcdStartable(manager),),
        health_check=HealthCheck(healthy, interval=INTERVAL, timeout=3.0, initial_delay=0.2),
        restart=RestartPolicy.ALWAYS,
        backoff_initial=1.0,
        backoff_max=15.0,
        skip_reason=lambda: None if etcd_binary() else "etcd binary not in image",
    )
