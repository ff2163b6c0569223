"""Where the dashboard's data comes from: the node API (``NodeAPISource``) and a Basalt
Fleet's REST API (``FleetAPISource``).

The app only knows the two protocols, so its widgets are tested with the fakes under
``tests/fakes/dashboard_source.py`` and these classes against real nodes and a real fleet.
Every poll asks for each part on its own: a part that fails (etcd on a worker, a role
the client lacks) is named in ``NodeSnapshot.errors`` and the rest is still shown.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .model import (
    FleetCluster,
    FleetRollout,
    FleetSnapshot,
    NodeSnapshot,
    Process,
    Service,
    Summary,
    boot_text,
    etcd_role,
    update_text,
)

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client
    from basalt.machinery.client.config import FleetLogin

#: Seconds one request of a poll may take before that part is reported as failed.
REQUEST_TIMEOUT = 10.0
#: Log lines asked for when a service's log is opened (then it follows).
LOG_TAIL = 200


class NodeSource(Protocol):
    """What the node views need: the nodes, one snapshot of a node, a followed log."""

    @property
    def nodes(self) -> Sequence[str]: ...

    async def snapshot(self, node: str) -> NodeSnapshot: ...

    def logs(self, node: str, service: str) -> AsyncIterator[str]:
        """The service's recent lines, then new ones as they come (until cancelled)."""
        ...

    async def close(self) -> None: ...


class FleetSource(Protocol):
    """What the fleet view needs: one snapshot of the fleet."""

    @property
    def url(self) -> str: ...

    async def snapshot(self) -> FleetSnapshot: ...


class NodeAPISource:
    """The machine API through one endpoint, as ``basaltctl`` talks to it elsewhere.

    ``connect`` makes the client on first use: gRPC's channel belongs to the event loop
    it was made on, which is the app's, not the command's.
    """

    def __init__(self, connect: Callable[[], Awaitable[Client]], nodes: Sequence[str]) -> None:
        self._connect = connect
        self._client: Client | None = None
        self._lock = asyncio.Lock()
        self._nodes = list(nodes)

    @property
    def nodes(self) -> Sequence[str]:
        return self._nodes

    async def client(self) -> Client:
        async with self._lock:
            if self._client is None:
                self._client = await self._connect()
            return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def snapshot(self, node: str) -> NodeSnapshot:
        client = await self.client()
        snap = NodeSnapshot(node=node, taken=time.time())
        parts: dict[str, Any] = {}

        async def part(name: str, read: Callable[[], Awaitable[Any]]) -> None:
            parts[name] = await self._guarded(snap, name, read)

        await asyncio.gather(
            part("version", lambda: self._unary(client, node, "Version")),
            part("services", lambda: self._unary(client, node, "ServiceList")),
            part("processes", lambda: self._unary(client, node, "Processes")),
            part("memory", lambda: self._unary(client, node, "Memory")),
            part("etcd", lambda: self._unary(client, node, "EtcdStatus")),
            *(
                part(kind, lambda kind=kind: self._resources(client, node, kind))  # type: ignore[misc]
                for kind in (
                    "MachineStatuses",
                    "BootStatuses",
                    "UpdateStatuses",
                    "NodeAddresses",
                    "SystemStats",
                    "Versions",
                )
            ),
        )
        _fill(snap, parts)
        return snap

    async def logs(self, node: str, service: str) -> AsyncIterator[str]:
        from basalt.machinery.api import machine_pb2

        client = await self.client()
        request = machine_pb2.LogsRequest(id=service, follow=True, tail_lines=LOG_TAIL)
        partial = ""
        async for chunk in client.machine.Logs(request, metadata=client.metadata([node])):
            if chunk.metadata.error:
                yield f"[{service} on {node}: {chunk.metadata.error}]"
                return
            text = partial + chunk.bytes.decode(errors="replace")
            *lines, partial = text.split("\n")
            for line in lines:
                yield line
        if partial:
            yield partial

    async def _guarded(
        self, snap: NodeSnapshot, name: str, read: Callable[[], Awaitable[Any]]
    ) -> Any:
        import grpc.aio

        try:
            return await read()
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            snap.errors[name] = f"{code.name if code else 'UNKNOWN'}: {exc.details()}"
        except _NodeError as exc:
            snap.errors[name] = str(exc)
        return None

    @staticmethod
    async def _unary(client: Client, node: str, rpc: str) -> Any:
        from basalt.machinery.api import common_pb2

        call = getattr(client.machine, rpc)
        answer = await call(
            common_pb2.Empty(), metadata=client.metadata([node]), timeout=REQUEST_TIMEOUT
        )
        for message in answer.messages:
            if message.metadata.error:
                raise _NodeError(message.metadata.code, message.metadata.error)
            return message
        raise _NodeError(0, "no answer")

    @staticmethod
    async def _resources(
        client: Client, node: str, kind: str
    ) -> list[tuple[float, dict[str, Any]]]:
        """(created, spec) of each resource of ``kind`` on ``node``."""
        from basalt.machinery.api import resource_pb2

        request = resource_pb2.ResourceListRequest(type=kind)
        found = []
        stream = client.resources.List(
            request, metadata=client.metadata([node]), timeout=REQUEST_TIMEOUT
        )
        async for item in stream:
            if item.metadata.error:
                raise _NodeError(item.metadata.code, item.metadata.error)
            found.append((item.resource.metadata.created, json.loads(item.resource.spec_json)))
        return found


class _NodeError(Exception):
    """A node's own error in an answer's metadata (the endpoint answered for it)."""

    def __init__(self, code: int, message: str) -> None:
        import grpc

        name = next((c.name for c in grpc.StatusCode if c.value[0] == code), "ERROR")
        super().__init__(f"{name}: {message}" if code else message)


def _first(parts: dict[str, Any], kind: str) -> dict[str, Any]:
    found = parts.get(kind) or []
    return dict(found[0][1]) if found else {}


def _fill(snap: NodeSnapshot, parts: dict[str, Any]) -> None:
    """Turn the answers of one poll into the snapshot (missing parts stay empty)."""
    version, memory, etcd = parts.get("version"), parts.get("memory"), parts.get("etcd")
    machine = _first(parts, "MachineStatuses")
    slot, boot = boot_text(_first(parts, "BootStatuses")) if parts.get("BootStatuses") else ("", "")
    stats = _first(parts, "SystemStats")
    versions = parts.get("Versions") or []
    worker = version is not None and version.machine_type == "worker"
    if worker:
        snap.errors.pop("etcd", None)  # a worker runs no etcd: not an error
    snap.summary = Summary(
        hostname=version.hostname if version else "",
        machine_type=version.machine_type if version else "",
        version=version.tag if version else "",
        mode=version.mode if version else "",
        platform=version.platform if version else "",
        stage=str(machine.get("stage", "")),
        ready=machine.get("ready") if machine else None,
        slot=slot,
        boot=boot,
        started=versions[0][0] if versions else 0.0,
        addresses=tuple(_first(parts, "NodeAddresses").get("addresses", ())),
        etcd="none (worker)"
        if worker
        else (etcd_role(etcd.member_id, etcd.leader, etcd.is_learner) if etcd else ""),
        update=update_text(_first(parts, "UpdateStatuses")) if parts.get("UpdateStatuses") else "",
        memory_total=memory.total if memory else 0,
        memory_used=memory.total - memory.available if memory else 0,
    )
    if parts.get("services") is not None:
        snap.services = [
            Service(s.id, s.state, s.health, s.restarts, s.message)
            for s in parts["services"].services
        ]
    if parts.get("processes") is not None:
        snap.processes = [
            Process(p.pid, p.args or p.command, p.cpu_time, p.resident_memory)
            for p in parts["processes"].processes
        ]
    snap.cpu_history = [float(v) for v in stats.get("cpu", ())]
    snap.memory_history = [float(v) for v in stats.get("memory", ())]
    snap.network_rx_history = [float(v) for v in stats.get("networkRx", ())]
    snap.network_tx_history = [float(v) for v in stats.get("networkTx", ())]


class FleetAPISource:
    """A Basalt Fleet's REST API with the login ``basaltctl fleet login`` stored."""

    def __init__(self, login: FleetLogin) -> None:
        self.login = login

    @property
    def url(self) -> str:
        return self.login.url

    async def snapshot(self) -> FleetSnapshot:
        from basalt.machinery.errors import BasaltError

        snap = FleetSnapshot(url=self.url)
        try:
            clusters, rollouts = await asyncio.gather(
                asyncio.to_thread(self._get, "/v1/clusters"),
                asyncio.to_thread(self._get, "/v1/rollouts"),
            )
            # Each cluster's nodes, for its health (few clusters: one request each).
            details = await asyncio.gather(
                *(asyncio.to_thread(self._get, f"/v1/clusters/{c['name']}") for c in clusters)
            )
        except BasaltError as exc:
            snap.error = str(exc)
            return snap
        snap.clusters = [
            FleetCluster(
                name=c["name"],
                status=c["status"],
                controlplanes=int(c["controlplanes"]),
                workers=int(c["workers"]),
                drifted=int(c["drifted"]),
                endpoint=c.get("endpoint") or "",
                message=c.get("message") or "",
                nodes=len(d.get("nodes") or ()),
                linked=sum(1 for n in d.get("nodes") or () if n.get("linked")),
            )
            for c, d in zip(clusters or [], details, strict=True)
        ]
        snap.rollouts = [
            FleetRollout(
                id=int(r["id"]),
                version=r["version"],
                channel=r["channel"],
                state=r["state"],
                wave=f"{r['wave']}/{max(int(r['waves']) - 1, 0)}",
                healthy=int(r["healthy"]),
                machines=int(r["machines"]),
                failed=int(r["failed"]),
                clusters=tuple(r.get("clusters") or ()),
            )
            for r in rollouts or []
        ]
        return snap

    def _get(self, path: str) -> Any:
        from ..fleet import request

        return request(self.login.url, self.login.token, self.login.ca, "GET", path)
