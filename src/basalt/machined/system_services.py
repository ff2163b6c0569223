"""The services a configured node runs, by machine type and platform.

Part of the composition root (:mod:`.assemble` calls it when the boot reaches its
services phase): it creates the API servers and the etcd manager."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from basalt.machinery.api import API_PORT, TRUST_PORT

from .services import HealthCheck, LogBuffer, RestartPolicy, ServiceSpec, TaskRunner

if TYPE_CHECKING:
    from .node import Node

#: Where the kubelet binary comes from: a ``kubernetes`` system extension in the image.
KUBELET_PATHS = ("/usr/local/bin", "/opt/basalt/extensions/kubernetes/bin")


def _port_check(address: str, port: int) -> HealthCheck:
    async def check() -> None:
        _, writer = await asyncio.open_connection(address, port)
        writer.close()
        await writer.wait_closed()

    return HealthCheck(check, interval=5.0, timeout=2.0, initial_delay=0.2)


def _server_service(node: Node, factory: type, port: int, name: str) -> ServiceSpec:
    async def serve(log: LogBuffer) -> None:
        server = factory(node, **({"maintenance": False} if name == "apid" else {}))
        await server.start()
        log.append(f"{name} listening on {node.address}:{port}".encode())
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop(grace=1.0)

    return ServiceSpec(
        id=name,
        runner=TaskRunner(serve, stop_timeout=3.0),
        health_check=_port_check(node.address, port),
        restart=RestartPolicy.ALWAYS,
        backoff_initial=0.5,
        backoff_max=10.0,
    )


def kubelet_binary(root: str = "/") -> str | None:
    """The kubelet binary shipped in the image, if any (PATH is not consulted)."""
    for directory in KUBELET_PATHS:
        candidate = os.path.join(root, directory.lstrip("/"), "kubelet")
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class _KubernetesAssetsRendered:
    """kubelet starts once its config and bootstrap kubeconfig are on disk."""

    description = "Kubernetes assets rendered"

    def __init__(self, node: Node) -> None:
        self.node = node

    async def wait(self) -> None:
        while self.node.store.get("KubernetesAssets", "assets") is None:
            await asyncio.sleep(0.2)


def _kubelet(node: Node) -> ServiceSpec:
    from basalt.machinery.kubernetes import kubelet_args

    from .services import ProcessRunner

    root = str(node.paths.root)
    binary = kubelet_binary(root)
    argv = [binary or "kubelet", "--v=2"]
    if node.config is not None:
        argv += kubelet_args(
            node.config, address=node.address, hostname=node.hostname, host_root=root
        )
    from .containerd.runtime import wanted as containerd_wanted

    return ServiceSpec(
        id="kubelet",
        runner=ProcessRunner(argv),
        # its container runtime is containerd's CRI (when this node runs containerd)
        depends_on=("apid", "containerd") if containerd_wanted(node) else ("apid",),
        conditions=(_KubernetesAssetsRendered(node),),
        skip_reason=lambda: None if binary else "kubelet binary not in image",
        restart=RestartPolicy.ALWAYS,
    )


def register_system_services(node: Node) -> None:
    from .api.server import ApiServer, TrustServer

    known = {s.id for s in node.supervisor.statuses()}
    wanted = [_server_service(node, ApiServer, API_PORT, "apid")]
    if node.is_controlplane:
        from .etcd.manager import EtcdManager, manager_of
        from .etcd.service import etcd_service

        wanted.append(_server_service(node, TrustServer, TRUST_PORT, "trustd"))
        manager = manager_of(node)
        if manager is None:
            from .etcd.observe import observe_forever

            node.etcd = manager = EtcdManager(node)
            node.background(observe_forever(node, manager), name="etcd-observe")
        wanted.append(etcd_service(node, manager))
    from .containerd.runtime import wanted as containerd_wanted

    if containerd_wanted(node):
        from .containerd.service import containerd_service

        wanted.append(containerd_service(node))
    wanted.append(_kubelet(node))
    from .extensions import extension_services

    # The image's system extensions (metal).
    wanted += extension_services(node.platform.extensions, node.platform.system_root)
    for spec in wanted:
        if spec.id in known:
            continue
        node.supervisor.register(spec)
        known.add(spec.id)
