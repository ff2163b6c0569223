"""Nodes for the cluster health checks, in memory: a NodeCaller that answers each RPC the
checks make from a plain per-node state, as the real node would shape its answer.

Tests change a node's state (its etcd members, its leader, its clock, ...) and run the
real checks against it; ``denied`` holds RPC names that answer PERMISSION_DENIED (a
caller without the role), ``down`` nodes that are unreachable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.message import Message

from basalt.machinery.api import common_pb2, machine_pb2, resource_pb2
from basalt.machinery.health import NodeCallError

M = TypeVar("M", bound=Message)


@dataclass
class FakeNode:
    address: str
    hostname: str
    machine_type: str = "controlplane"
    tag: str = "0.1.0"
    checks: list[tuple[str, bool, str]] = field(
        default_factory=lambda: [
            ("stage", True, "node is running"),
            ("service apid", True, "running, healthy"),
        ]
    )
    etcd_members: list[tuple[int, str, bool]] = field(default_factory=list)
    etcd_id: int = 0
    etcd_leader: int = 0
    boot: dict[str, Any] | None = None
    time: dict[str, Any] = field(default_factory=lambda: {"synced": False, "servers": []})
    #: This node's clock minus the true time (seconds).
    clock_offset: float = 0.0
    kubeconfig: bytes = b""


class FakeNodes:
    """A NodeCaller over :class:`FakeNode` states; '' is the first node (the endpoint)."""

    def __init__(self, nodes: list[FakeNode], now: Any) -> None:
        self.nodes = {n.address: n for n in nodes}
        self.now = now
        self.denied: set[str] = set()
        self.down: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        #: Called with (node, rpc) before each answer: a test changes state mid-run here.
        self.before_answer: Callable[[str, str], None] = lambda node, rpc: None

    def _node(self, address: str, rpc: str) -> FakeNode:
        node = self.nodes.get(address) if address else next(iter(self.nodes.values()))
        self.calls.append((address, rpc))
        self.before_answer(address, rpc)
        if node is None:
            raise NodeCallError(address, "NOT_FOUND", f"{address} is not a member")
        if node.address in self.down:
            raise NodeCallError(address, "UNAVAILABLE", "connection refused")
        if rpc in self.denied:
            raise NodeCallError(address, "PERMISSION_DENIED", f"{rpc} needs another role")
        return node

    async def unary(
        self, node: str, method: str, request: Message, answer: type[M], timeout: float
    ) -> M:
        rpc = method.rsplit("/", 1)[-1]
        found = self._node(node, rpc)
        meta = common_pb2.Metadata(node=found.address)
        message: Any
        if rpc == "Version":
            message = machine_pb2.VersionInfo(metadata=meta, tag=found.tag, hostname=found.hostname)
        elif rpc == "Health":
            message = machine_pb2.Health(
                metadata=meta,
                healthy=all(ok for _, ok, _ in found.checks),
                checks=[
                    machine_pb2.HealthCheck(name=n, ok=o, message=t) for n, o, t in found.checks
                ],
            )
        elif rpc == "EtcdMemberList":
            message = machine_pb2.EtcdMembers(
                metadata=meta,
                members=[
                    machine_pb2.EtcdMember(id=i, hostname=h, is_learner=learner)
                    for i, h, learner in found.etcd_members
                ],
            )
        elif rpc == "EtcdStatus":
            message = machine_pb2.EtcdMemberStatus(
                metadata=meta, member_id=found.etcd_id, leader=found.etcd_leader
            )
        elif rpc == "TimeCheck":
            message = machine_pb2.TimeCheck(
                metadata=meta, node_time=self.now() + found.clock_offset
            )
        elif rpc == "Kubeconfig":
            message = machine_pb2.Kubeconfig(metadata=meta, data=found.kubeconfig)
        elif rpc == "Get":
            assert isinstance(request, resource_pb2.ResourceGetRequest)
            spec = {"BootStatuses": found.boot, "TimeStatuses": found.time}[request.type]
            if spec is None:
                raise NodeCallError(node, "NOT_FOUND", f"{request.type} not found")
            message = resource_pb2.ResourceGet(
                metadata=meta, resource=resource_pb2.Resource(spec_json=json.dumps(spec))
            )
        else:
            raise NodeCallError(node, "UNIMPLEMENTED", rpc)
        return answer(messages=[message])  # type: ignore[call-arg]

    async def stream(
        self, node: str, method: str, request: Message, answer: type[M], timeout: float
    ) -> list[M]:
        rpc = method.rsplit("/", 1)[-1]
        found = self._node(node, rpc)
        assert rpc == "List" and isinstance(request, resource_pb2.ResourceListRequest)
        meta = common_pb2.Metadata(node=found.address)
        out = []
        for member in self.nodes.values():
            spec = {
                "hostname": member.hostname,
                "machineType": member.machine_type,
                "addresses": [member.address],
                "version": member.tag,
                "lastSeen": 0.0,
            }
            out.append(
                answer(  # type: ignore[call-arg]
                    metadata=meta, resource=resource_pb2.Resource(spec_json=json.dumps(spec))
                )
            )
        return out


@dataclass
class FakeKubeAnswer:
    status: int
    body: dict[str, Any]


class FakeKubeApi:
    """GET answers from a dict path -> (status, body)."""

    def __init__(self, answers: dict[str, tuple[int, dict[str, Any]]]) -> None:
        self.answers = answers
        self.paths: list[str] = []

    async def get(self, path: str) -> FakeKubeAnswer:
        self.paths.append(path)
        status, body = self.answers.get(path, (404, {"message": "not found"}))
        return FakeKubeAnswer(status, body)


def healthy_cluster() -> list[FakeNode]:
    """Three control planes (etcd ids 1..3, leader 1) and a worker, all healthy."""
    members = [(1, "cp-1", False), (2, "cp-2", False), (3, "cp-3", False)]
    nodes = [
        FakeNode(
            f"127.0.0.{i}",
            f"cp-{i}",
            checks=[("stage", True, "node is running"), ("service etcd", True, "running, healthy")],
            etcd_members=list(members),
            etcd_id=i,
            etcd_leader=1,
        )
        for i in (1, 2, 3)
    ]
    nodes.append(FakeNode("127.0.0.4", "worker-1", machine_type="worker"))
    return nodes
