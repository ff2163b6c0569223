"""etcd managed through the Basalt API on a 3-control-plane + 1-worker process cluster.

Real etcd (Debian's etcd-server), real mTLS. The tests run in order: each leaves the
cluster with three healthy voting members for the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import grpc.aio
import pytest

from basalt.machined.etcd.client import EtcdClient, client_url
from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.client.client import Client
from basalt.machinery.client.config import issue_client_context
from basalt.machinery.pki import CertificateAndKey, issue_certificate
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    live = start_cluster(
        tmp_path_factory.mktemp("etcd"), "etcd", "127.0.0.191", controlplanes=3, workers=1
    )
    yield live
    stop_cluster(live)


def etcd_client(cluster: LiveCluster, address: str) -> EtcdClient:
    etcd_ca = cluster.secrets["certs"]["etcd"]
    ca = CertificateAndKey(etcd_ca["crt"], etcd_ca["key"])
    return EtcdClient(client_url(address), ca.crt, issue_certificate(ca, "test", client=True))


async def call(
    cluster: LiveCluster, rpc: str, request: Any, nodes: Sequence[str], **kwargs: Any
) -> list[Any]:
    client = await cluster.client(nodes=nodes, **kwargs)
    try:
        answer = await getattr(client.machine, rpc)(request, metadata=client.metadata(), timeout=60)
        return list(answer.messages)
    finally:
        await client.close()


def members(cluster: LiveCluster, node: str) -> list[tuple[str, bool]]:
    (answer,) = run(call(cluster, "EtcdMemberList", common_pb2.Empty(), [node]))
    assert not answer.metadata.error, answer.metadata.error
    return sorted((m.hostname, m.is_learner) for m in answer.members)


def etcd_events(cluster: LiveCluster, node: str) -> list[str]:
    async def go() -> list[str]:
        client = await cluster.client(node)
        try:
            request = machine_pb2.EventsRequest()
            return [e.message async for e in client.machine.Events(request, timeout=10)]
        finally:
            await client.close()

    return run(go())


def wait_members(cluster: LiveCluster, node: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    seen: list[tuple[str, bool]] = []
    while time.monotonic() < deadline:
        try:
            seen = members(cluster, node)
            if len(seen) == count and not any(learner for _, learner in seen):
                return
        except (AssertionError, grpc.aio.AioRpcError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"expected {count} voting members, saw {seen}")


def wait_etcd_healthy(cluster: LiveCluster, timeout: float = 60) -> None:
    """Until every control plane reports every etcd member healthy and one leader."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        answers = run(call(cluster, "Health", common_pb2.Empty(), cluster.controlplanes))
        bad = [
            f"{a.metadata.node}: {c.name}: {c.message}"
            for a in answers
            for c in a.checks
            if c.name.startswith("etcd") and not c.ok
        ] + [f"{a.metadata.node}: {a.metadata.error}" for a in answers if a.metadata.error]
        if not bad and all(any(c.name == "etcd members" for c in a.checks) for a in answers):
            return
        last = "; ".join(bad)
        time.sleep(0.5)
    raise AssertionError(f"etcd not healthy: {last}")


def test_cluster_create_bootstraps_and_the_others_join(cluster: LiveCluster) -> None:
    for node in cluster.controlplanes:
        assert [learner for _, learner in members(cluster, node)] == [False, False, False]
    (worker_services,) = run(call(cluster, "ServiceList", common_pb2.Empty(), cluster.workers))
    assert "etcd" not in {s.id for s in worker_services.services}  # workers never run etcd


def test_second_bootstrap_is_refused_listing_members(cluster: LiveCluster) -> None:
    answers = run(call(cluster, "Bootstrap", machine_pb2.BootstrapRequest(), cluster.controlplanes))
    for answer in answers:
        assert answer.metadata.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
        assert "cluster already bootstrapped, members: " in answer.metadata.error
        assert "etcd-controlplane-2" in answer.metadata.error


def test_health_includes_etcd(cluster: LiveCluster) -> None:
    answers = run(call(cluster, "Health", common_pb2.Empty(), cluster.controlplanes))
    for answer in answers:
        checks = {c.name: c for c in answer.checks}
        assert checks["etcd members"].ok, checks["etcd members"].message
        assert checks["etcd leader"].ok and checks["etcd raft"].ok
        assert answer.healthy


def _leader(cluster: LiveCluster) -> str:
    answers = run(call(cluster, "EtcdStatus", common_pb2.Empty(), cluster.controlplanes))
    return next(a.metadata.node for a in answers if a.member_id == a.leader)


def test_forfeit_leadership_moves_the_leader(cluster: LiveCluster) -> None:
    leader = _leader(cluster)
    (answer,) = run(call(cluster, "EtcdForfeitLeadership", common_pb2.Empty(), [leader]))
    assert "leadership moved from" in answer.message
    deadline = time.monotonic() + 15
    while _leader(cluster) == leader:
        assert time.monotonic() < deadline, "leader did not change"
        time.sleep(0.2)


def test_backup_role_may_snapshot_and_read_status_but_not_leave(cluster: LiveCluster) -> None:
    context = issue_client_context(cluster.os_ca, endpoints=[], roles=[Role.ETCD_BACKUP])

    async def go() -> tuple[int, int, grpc.StatusCode]:
        client = await cluster.client(crt=context.crt, key=context.key)
        try:
            size = 0
            async for chunk in client.machine.EtcdSnapshot(common_pb2.Empty(), timeout=60):
                size += len(chunk.bytes)
            status = await client.machine.EtcdStatus(common_pb2.Empty(), timeout=10)
            try:
                await client.machine.EtcdLeaveCluster(
                    machine_pb2.EtcdLeaveClusterRequest(), timeout=10
                )
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            return size, len(status.messages), code
        finally:
            await client.close()

    size, statuses, leave = run(go())
    assert size > 10_000 and statuses == 1
    assert leave == grpc.StatusCode.PERMISSION_DENIED


@contextlib.contextmanager
def etcd_stopped(cluster: LiveCluster, node: str) -> Iterator[None]:
    """etcd stopped on ``node`` for the block; then started, and the cluster whole again."""
    stop = machine_pb2.ServiceActionRequest(id="etcd", action=machine_pb2.STOP)
    run(call(cluster, "ServiceAction", stop, [node]))
    try:
        time.sleep(1.0)
        yield
    finally:
        start = machine_pb2.ServiceActionRequest(id="etcd", action=machine_pb2.START)
        run(call(cluster, "ServiceAction", start, [node]))
    wait_members(cluster, cluster.controlplanes[0], 3)
    wait_etcd_healthy(cluster)


def test_leaving_is_refused_when_it_would_cost_quorum(cluster: LiveCluster) -> None:
    cp1, cp2, cp3 = cluster.controlplanes
    with etcd_stopped(cluster, cp2):
        (answer,) = run(
            call(cluster, "EtcdLeaveCluster", machine_pb2.EtcdLeaveClusterRequest(), [cp3])
        )
        assert answer.metadata.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "leaving would cost etcd quorum: 1 of 2 remaining members healthy" in (
            answer.metadata.error
        )
        assert "etcd-controlplane-2: unreachable" in answer.metadata.error
        (reset,) = run(call(cluster, "Reset", machine_pb2.ResetRequest(graceful=True), [cp3]))
        assert reset.metadata.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert members(cluster, cp1) == members(cluster, cp3)  # nothing changed


def test_removing_a_member_is_refused_when_it_would_cost_quorum(cluster: LiveCluster) -> None:
    # etcd runs without its strict reconfiguration check: machined's own check refuses.
    cp1, cp2, _ = cluster.controlplanes
    with etcd_stopped(cluster, cp2):
        request = machine_pb2.EtcdRemoveMemberRequest(member="etcd-controlplane-3")
        (answer,) = run(call(cluster, "EtcdRemoveMember", request, [cp1]))
        assert answer.metadata.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "removing etcd-controlplane-3 would leave 1 healthy of 2 voters, 2 needed" in (
            answer.metadata.error
        )
        assert "etcd-controlplane-2: unreachable" in answer.metadata.error
        assert len(members(cluster, cp1)) == 3  # nothing changed


def _reboot_and_wait(cluster: LiveCluster, node: str) -> None:
    run(call(cluster, "Reboot", machine_pb2.RebootRequest(), [node]))
    time.sleep(1.0)
    run(cluster.wait_ready(node, timeout=90))


def test_leave_then_rejoin_after_reboot(cluster: LiveCluster) -> None:
    cp1, _, cp3 = cluster.controlplanes
    (answer,) = run(call(cluster, "EtcdLeaveCluster", machine_pb2.EtcdLeaveClusterRequest(), [cp3]))
    assert not answer.metadata.error, answer.metadata.error
    assert "etcd-controlplane-3" not in {name for name, _ in members(cluster, cp1)}
    _reboot_and_wait(cluster, cp3)
    wait_members(cluster, cp1, 3)
    wait_etcd_healthy(cluster)


def test_a_join_waits_while_a_voter_is_unhealthy(cluster: LiveCluster) -> None:
    cp1, cp2, cp3 = cluster.controlplanes
    (answer,) = run(call(cluster, "EtcdLeaveCluster", machine_pb2.EtcdLeaveClusterRequest(), [cp3]))
    assert not answer.metadata.error, answer.metadata.error
    with etcd_stopped(cluster, cp2):
        # Not ready until its etcd joined: wait for the event, not for readiness.
        run(call(cluster, "Reboot", machine_pb2.RebootRequest(), [cp3]))
        time.sleep(1.0)
        deadline = time.monotonic() + 90
        waits = "etcd join waits: a voting member is not healthy"
        seen: list[str] = []
        while waits not in seen:
            assert time.monotonic() < deadline, seen
            time.sleep(0.5)
            with contextlib.suppress(grpc.aio.AioRpcError, OSError):
                seen = etcd_events(cluster, cp3)
        assert [name for name, _ in members(cluster, cp1)] == [
            "etcd-controlplane-1",
            "etcd-controlplane-2",
        ]


def test_remove_member_then_reset_and_reinstall_rejoins(cluster: LiveCluster) -> None:
    cp1, _, cp3 = cluster.controlplanes
    request = machine_pb2.EtcdRemoveMemberRequest(member="etcd-controlplane-3")
    (answer,) = run(call(cluster, "EtcdRemoveMember", request, [cp1]))
    assert "removed etcd member etcd-controlplane-3" in answer.message
    assert len(members(cluster, cp1)) == 2
    _reset_and_reinstall(cluster, cp3, graceful=False)
    wait_members(cluster, cp1, 3)
    wait_etcd_healthy(cluster)


def test_graceful_reset_leaves_etcd_first(cluster: LiveCluster) -> None:
    cp1, _, cp3 = cluster.controlplanes
    _reset_and_reinstall(
        cluster, cp3, graceful=True, check_left=lambda: len(members(cluster, cp1)) == 2
    )
    wait_members(cluster, cp1, 3)


def _reset_and_reinstall(
    cluster: LiveCluster, node: str, *, graceful: bool, check_left: Any = None
) -> None:
    request = machine_pb2.ResetRequest(graceful=graceful, wipe_mode=machine_pb2.ALL, reboot=True)
    (answer,) = run(call(cluster, "Reset", request, [node]))
    assert not answer.metadata.error, answer.metadata.error

    async def reinstall() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                client = await Client.connect(node, insecure=True)
                try:
                    version = await client.machine.Version(common_pb2.Empty(), timeout=2)
                    if version.messages[0].mode == "maintenance":
                        await client.machine.ApplyConfiguration(
                            machine_pb2.ApplyConfigurationRequest(
                                data=cluster.config_text("controlplane").encode()
                            ),
                            timeout=10,
                        )
                        return
                finally:
                    await client.close()
            except Exception:
                pass
            await asyncio.sleep(0.3)
        raise AssertionError(f"{node} did not come back in maintenance mode")

    run(reinstall())
    if check_left is not None:
        assert check_left()
    run(cluster.wait_ready(node, timeout=90))


def test_snapshot_then_recover_on_a_fresh_cluster(
    cluster: LiveCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async def write(key: bytes, value: bytes) -> None:
        async with etcd_client(cluster, cluster.controlplanes[0]) as client:
            await client.put(key, value)

    run(write(b"/basalt-test/before", b"in the snapshot"))

    async def snapshot() -> bytes:
        client = await cluster.client()
        try:
            return b"".join(
                [c.bytes async for c in client.machine.EtcdSnapshot(common_pb2.Empty(), timeout=60)]
            )
        finally:
            await client.close()

    data = run(snapshot())
    run(write(b"/basalt-test/after", b"not in the snapshot"))

    from basalt.provision.process import ClusterRequest, create, destroy, load_context

    fresh_dir = tmp_path_factory.mktemp("recover") / "r"
    record = run(
        create(
            ClusterRequest(
                name="r",
                controlplanes=1,
                workers=0,
                base_address="127.0.0.198",
                version_contract="0.1",
                bootstrap=False,
                machined_args=("--announce-interval", "1"),
            ),
            fresh_dir,
            lambda n, s: None,
        )
    )
    try:
        _, context = load_context(record).current()
        node = record.nodes[0].address

        async def recover() -> None:
            client = await Client.connect(node, ca=context.ca, crt=context.crt, key=context.key)
            try:

                async def chunks() -> Any:
                    for start in range(0, len(data), 64 * 1024):
                        yield common_pb2.Data(bytes=data[start : start + 64 * 1024])

                await client.machine.EtcdRecover(chunks(), timeout=60)
                await client.machine.Bootstrap(
                    machine_pb2.BootstrapRequest(recover_etcd=True), timeout=30
                )
            finally:
                await client.close()

        run(recover())
        import yaml

        secrets = yaml.safe_load((fresh_dir / "secrets.yaml").read_text())
        fresh = LiveCluster(record, context, secrets)

        async def read() -> tuple[bytes | None, bytes | None]:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with etcd_client(fresh, node) as client:
                        return (
                            await client.get(b"/basalt-test/before"),
                            await client.get(b"/basalt-test/after"),
                        )
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)

        before, after = run(read())
        assert before == b"in the snapshot"
        assert after is None
        second = run(call(fresh, "Bootstrap", machine_pb2.BootstrapRequest(), [node]))
        assert second[0].metadata.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    finally:
        run(destroy(record))
