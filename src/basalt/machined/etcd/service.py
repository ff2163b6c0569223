"""The ``etcd`` service spec (control planes only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..services import HealthCheck, RestartPolicy, ServiceSpec
from .manager import EtcdManager, EtcdRunner, EtcdStartable, etcd_binary

if TYPE_CHECKING:
    from ..node import Node


def etcd_service(node: Node, manager: EtcdManager) -> ServiceSpec:
    async def healthy() -> None:
        async with manager.client(timeout=2.0) as client:
            status = await client.status()
        if status.errors:
            raise RuntimeError("; ".join(status.errors))
        if status.isLearner:
            raise RuntimeError("still a learner, catching up before promotion")

    return ServiceSpec(
        id="etcd",
        runner=EtcdRunner(manager),
        conditions=(EtcdStartable(manager),),
        health_check=HealthCheck(healthy, interval=1.0, timeout=3.0, initial_delay=0.2),
        restart=RestartPolicy.ALWAYS,
        backoff_initial=1.0,
        backoff_max=15.0,
        skip_reason=lambda: None if etcd_binary() else "etcd binary not in image",
    )
