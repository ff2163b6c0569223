"""Containers and their tasks across containerd's namespaces (``containers ps``, ``stats``).

Read-only: Namespaces.List, then Containers.List and Tasks.List in each namespace. A
container without a task is listed with pid 0 and no status. Kubernetes pod and
container names come from the CRI's labels when the kubelet created the container.
"""

from __future__ import annotations

from dataclasses import dataclass

from basalt.machinery.api.containerd import (
    containers_pb2,
    namespaces_pb2,
    namespaces_pb2_grpc,
    tasks_pb2,
)

from .client import ContainerdClient

__all__ = ["POD_LABEL", "ContainerSummary", "list_containers"]

POD_LABEL = "io.kubernetes.pod.name"
NAME_LABEL = "io.kubernetes.container.name"
_STATUS = {
    tasks_pb2.UNKNOWN: "unknown",
    tasks_pb2.CREATED: "created",
    tasks_pb2.RUNNING: "running",
    tasks_pb2.STOPPED: "stopped",
    tasks_pb2.PAUSED: "paused",
    tasks_pb2.PAUSING: "pausing",
}


@dataclass(frozen=True)
class ContainerSummary:
    namespace: str
    id: str
    image: str
    pid: int
    status: str
    pod: str
    name: str
    created: float


async def namespaces(client: ContainerdClient) -> list[str]:
    stub = namespaces_pb2_grpc.NamespacesStub(client.channel)
    answer = await stub.List(namespaces_pb2.ListNamespacesRequest(), timeout=client.timeout)
    return sorted(n.name for n in answer.namespaces)


async def list_containers(client: ContainerdClient, namespace: str = "") -> list[ContainerSummary]:
    """Every container of ``namespace`` (empty: of every namespace), sorted by
    namespace and id. ``client``'s own namespace is left as it was."""
    wanted = [namespace] if namespace else await namespaces(client)
    found: list[ContainerSummary] = []
    saved = client.namespace
    try:
        for name in wanted:
            client.namespace = name
            found.extend(await _in_namespace(client, name))
    finally:
        client.namespace = saved
    return sorted(found, key=lambda c: (c.namespace, c.id))


async def _in_namespace(client: ContainerdClient, namespace: str) -> list[ContainerSummary]:
    listed = await client.call(client.containers.List, containers_pb2.ListContainersRequest())
    tasks = await client.call(client.tasks.List, tasks_pb2.ListTasksRequest())
    # containerd 1.6 names a task's container in ``id`` and leaves ``container_id`` empty.
    by_container = {t.container_id or t.id: t for t in tasks.tasks}
    summaries = []
    for container in listed.containers:
        task = by_container.get(container.id)
        created = container.created_at.seconds + container.created_at.nanos / 1e9
        summaries.append(
            ContainerSummary(
                namespace=namespace,
                id=container.id,
                image=container.image,
                pid=int(task.pid) if task else 0,
                status=_STATUS.get(task.status, "unknown") if task else "",
                pod=container.labels.get(POD_LABEL, ""),
                name=container.labels.get(NAME_LABEL, ""),
                created=created,
            )
        )
    return summaries
