"""Destructive etcd verbs on a one-control-plane cluster (the case that used to wipe etcd).

``etcd leave`` and ``remove-member`` are admin-only; ``--force`` skips the quorum check but
never the last-member check: only an explicit ``--destroy-last-member`` (admin) ends the
cluster. A graceful reset of the last member is held to the same rule.
"""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
import pytest

from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.client.config import issue_client_context
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    live = start_cluster(tmp_path_factory.mktemp("etcdguard"), "guard", "127.0.0.145", workers=0)
    yield live
    stop_cluster(live)


async def _call(cluster: LiveCluster, role: Role, rpc: str, request: Any) -> Any:
    context = issue_client_context(cluster.os_ca, endpoints=[], roles=[role])
    client = await cluster.client(crt=context.crt, key=context.key)
    try:
        return await getattr(client.machine, rpc)(request, timeout=30)
    finally:
        await client.close()


def _code(cluster: LiveCluster, role: Role, rpc: str, request: Any) -> tuple[Any, str]:
    try:
        run(_call(cluster, role, rpc, request))
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _members(cluster: LiveCluster) -> int:
    answer = run(_call(cluster, Role.ADMIN, "EtcdMemberList", common_pb2.Empty()))
    return len(answer.messages[0].members)


def test_an_operator_cannot_make_a_member_leave_or_remove_one(cluster: LiveCluster) -> None:
    forced = machine_pb2.EtcdLeaveClusterRequest(force=True, destroy_last_member=True)
    code, details = _code(cluster, Role.OPERATOR, "EtcdLeaveCluster", forced)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "os:admin" in details
    remove = machine_pb2.EtcdRemoveMemberRequest(member="guard-controlplane-1")
    assert _code(cluster, Role.OPERATOR, "EtcdRemoveMember", remove)[0] == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert _members(cluster) == 1


def test_force_does_not_let_the_last_member_leave(cluster: LiveCluster) -> None:
    code, details = _code(
        cluster, Role.ADMIN, "EtcdLeaveCluster", machine_pb2.EtcdLeaveClusterRequest(force=True)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "last etcd member" in details and "--destroy-last-member" in details
    reset = machine_pb2.ResetRequest(graceful=True, force=True)
    code, details = _code(cluster, Role.ADMIN, "Reset", reset)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "last etcd member" in details
    assert _members(cluster) == 1
    data = cluster.node_dir(cluster.controlplanes[0]) / "var" / "lib" / "etcd"
    assert data.is_dir() and any(data.iterdir())


def test_an_admin_may_end_the_cluster_explicitly(cluster: LiveCluster) -> None:
    request = machine_pb2.EtcdLeaveClusterRequest(destroy_last_member=True)
    answer = run(_call(cluster, Role.ADMIN, "EtcdLeaveCluster", request))
    assert "left the etcd cluster" in answer.messages[0].message
