"""Discovery on a process cluster: 3 control planes + 2 workers and a real
``basalt-discovery`` process, every node publishing through DiscoveryConfig (TTL 8 s).

The tests run in order on one cluster: every node lists every other within 5 s of its
start; the service restarted mid-way keeps every record (its snapshot); a new control
plane whose cluster endpoint leads nowhere joins etcd through discovery alone; a killed
node's record runs out at its TTL, a node shut down gracefully deletes its own at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from basalt.machinery.api import common_pb2, machine_pb2, resource_pb2
from basalt.machinery.config import ClusterConfig, load_bundle, parse_patch
from basalt.machinery.discovery import Affiliate, ClusterKeys, DiscoveryClient
from basalt.machinery.yamlio import dump_documents
from basalt.provision import common
from basalt.provision.process import create_machines, destroy
from basalt.provision.state import NodeRecord
from tests.fakes.cluster import FAST, LiveCluster, run, start_cluster, stop_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = "127.0.4.11"  # .11-.15: the cluster; .16: the control plane that joins later
JOINER_BASE = "127.0.4.16"
SERVICE_HOST = "127.0.4.20"
SERVICE_URL = f"grpc://{SERVICE_HOST}:3000"
NOWHERE = "https://127.0.4.30:6443"  # the joiner's cluster endpoint: nothing listens
TTL = 8.0
WITHIN = 5.0
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]

SERVE = (sys.executable, "-m", "basalt.discovery", "serve", "--snapshot-interval", "1")
PATCH = parse_patch(
    f"apiVersion: basalt.dev/v1alpha1\nkind: DiscoveryConfig\nurl: {SERVICE_URL}\nttl: 8s\n",
    "discovery.yaml",
)


@dataclass
class Service:
    """``basalt-discovery serve`` with its state in ``state``; restartable."""

    state: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*SERVE, "--listen", f"{SERVICE_HOST}:3000", "--state", str(self.state)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((SERVICE_HOST, 3000), 0.2):
                return
            assert self.process.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"the discovery service did not start: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("discovery-service")
    made = Service(root / "state", root / "service.log")
    made.start()
    yield made
    made.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, service: Service) -> Iterator[LiveCluster]:
    live = start_cluster(
        tmp_path_factory.mktemp("discovery"),
        "disc",
        BASE,
        controlplanes=3,
        workers=2,
        patches=(PATCH,),
    )
    yield live
    stop_cluster(live)


@pytest.fixture(scope="module")
def keys(cluster: LiveCluster) -> ClusterKeys:
    document = load_bundle(cluster.config_text("controlplane")).first(ClusterConfig)
    assert document is not None
    return ClusterKeys.from_config(document.id, document.secret)


# -- reading nodes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Listed:
    hostname: str
    created: float


async def _list(cluster: LiveCluster, address: str, type_: str) -> list[tuple[Any, dict[str, Any]]]:
    client = await cluster.client(address)
    try:
        found = []
        async for item in client.resources.List(
            resource_pb2.ResourceListRequest(type=type_), timeout=10
        ):
            found.append((item.resource.metadata, json.loads(item.resource.spec_json)))
        return found
    finally:
        await client.close()


def affiliates(cluster: LiveCluster, address: str) -> dict[str, Listed]:
    """hostname -> when this node first listed it (its clock: the host's)."""
    listed = run(_list(cluster, address, "Affiliates"))
    return {spec["hostname"]: Listed(spec["hostname"], meta.created) for meta, spec in listed}


def started(cluster: LiveCluster, address: str) -> float:
    """When the node took its config (discovery can start from then)."""
    listed = run(_list(cluster, address, "MachineConfigs"))
    return float(next(meta.created for meta, _ in listed if meta.id == "v1alpha1"))


def hostname_of(cluster: LiveCluster, address: str) -> str:
    return str(run(cluster.resource(address, "Hostnames", "hostname"))["hostname"])


def wait_until(check: Any, timeout: float, what: str, poll: float = 0.2) -> float:
    """Seconds until ``check()`` is true; fails naming ``what`` (and the last value)."""
    begun = time.monotonic()
    last: Any = None
    while time.monotonic() - begun < timeout:
        with contextlib.suppress(Exception):
            last = check()
            if last:
                return time.monotonic() - begun
        time.sleep(poll)
    raise AssertionError(f"{what} not within {timeout}s (last: {last!r})")


def lags(cluster: LiveCluster, addresses: list[str]) -> list[tuple[str, str, float]]:
    """(lister, listed, seconds from the later of both starts until the lister had it)."""
    starts = {a: started(cluster, a) for a in addresses}
    names = {a: hostname_of(cluster, a) for a in addresses}
    found = []
    for lister in addresses:
        seen = affiliates(cluster, lister)
        for other in addresses:
            if other == lister:
                continue
            entry = seen.get(names[other])
            assert entry is not None, f"{names[lister]} does not list {names[other]}: {seen}"
            found.append(
                (names[lister], names[other], entry.created - max(starts[lister], starts[other]))
            )
    return found


# -- the tests, in order ---------------------------------------------------------------------------


def test_every_node_lists_every_other_within_5s_of_its_start(cluster: LiveCluster) -> None:
    addresses = cluster.controlplanes + cluster.workers
    found = lags(cluster, addresses)
    worst = max(found, key=lambda row: row[2])
    print(f"\ndiscovery: {len(found)} pairs, slowest {worst[0]} -> {worst[1]}: {worst[2]:.2f}s")
    assert worst[2] <= WITHIN, found
    # get members: the trust list and discovery agree on the five.
    members = run(_list(cluster, cluster.workers[-1], "Members"))
    assert {spec["hostname"] for _, spec in members} == {n.name for n in cluster.record.nodes}
    status = run(cluster.resource(cluster.workers[0], "DiscoveryStatuses", "discovery"))
    assert status["state"] == "connected" and status["affiliates"] == 5, status


def test_basaltctl_get_affiliates(cluster: LiveCluster) -> None:
    config = Path(cluster.record.state_dir) / "basaltconfig"
    result = subprocess.run(
        [*BASALTCTL, "get", "affiliates", "-n", cluster.workers[0]],
        env={**os.environ, "BASALTCONFIG": str(config)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "HOSTNAME" in out and "MACHINE TYPE" in out and "BASALT" in out
    for node in cluster.record.nodes:
        assert node.name in out


def test_the_service_restarted_mid_way_loses_no_record(
    cluster: LiveCluster, service: Service, keys: ClusterKeys
) -> None:
    sentinel = Affiliate("test", "sentinel", "worker", ("192.0.2.1",), "test")

    async def publish_and_list() -> list[str]:
        async with DiscoveryClient(SERVICE_URL, keys) as client:
            await client.update("sentinel", sentinel, ttl=600)
            return [affiliate_id for affiliate_id, _ in await client.list()]

    before = run(publish_and_list())
    assert len(before) == 6
    service.stop()
    service.start()

    async def listed() -> list[str]:
        async with DiscoveryClient(SERVICE_URL, keys) as client:
            return [affiliate_id for affiliate_id, _ in await client.list()]

    # The sentinel is refreshed by no one: only the snapshot can have kept it.
    assert run(listed()) == before
    # Every node watches again and still lists the others.
    names = {n.name for n in cluster.record.nodes} | {"sentinel"}

    def reconnected(address: str) -> bool:
        status = run(cluster.resource(address, "DiscoveryStatuses", "discovery"))
        return names <= set(affiliates(cluster, address)) and status["state"] == "connected"

    for address in cluster.controlplanes + cluster.workers:
        wait_until(lambda a=address: reconnected(a), 15, f"{address} connected again")

    async def forget_sentinel() -> None:
        async with DiscoveryClient(SERVICE_URL, keys) as client:
            await client.delete("sentinel")

    run(forget_sentinel())


def _joiner_config(cluster: LiveCluster) -> str:
    documents = load_bundle(cluster.config_text("controlplane")).to_raw()
    for document in documents:
        if document["kind"] == "ClusterConfig":
            document["controlPlane"]["endpoint"] = NOWHERE
    return dump_documents(documents)


def _etcd_members(cluster: LiveCluster, address: str) -> list[tuple[str, bool]]:
    async def go() -> list[tuple[str, bool]]:
        client = await cluster.client(address)
        try:
            answer = await client.machine.EtcdMemberList(common_pb2.Empty(), timeout=20)
        finally:
            await client.close()
        (message,) = answer.messages
        return sorted((m.hostname, m.is_learner) for m in message.members)

    return run(go())


def test_a_new_control_plane_joins_etcd_through_discovery_alone(
    cluster: LiveCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    state = tmp_path_factory.mktemp("joiner") / "joiner"
    record = run(
        create_machines(
            "disc-new", 1, state, lambda n, s: None, base_address=JOINER_BASE, machined_args=FAST
        )
    )
    try:
        (machine,) = record.nodes
        host, port = NOWHERE.removeprefix("https://").split(":")
        with pytest.raises(OSError):  # the premise: its endpoint answers nothing
            socket.create_connection((host, int(port)), 1).close()
        begun = time.monotonic()
        run(common.apply_config(machine.address, _joiner_config(cluster)))
        names = {n.name for n in cluster.record.nodes} | {machine.name}

        def joined() -> bool:
            members = _etcd_members(cluster, cluster.controlplanes[0])
            return machine.name in dict(members) and not any(learner for _, learner in members)

        wait_until(joined, 90, f"{machine.name} a voting etcd member", poll=0.5)
        took = time.monotonic() - begun
        print(f"\ndiscovery: {machine.name} a voting etcd member {took:.1f}s after its config")
        assert len(_etcd_members(cluster, machine.address)) == 4
        # It never reached the trust service: its member list is discovery's.
        members = run(_list(cluster, machine.address, "Members"))
        assert {spec["hostname"] for _, spec in members} == names
        # And it was listed, and listed the others, within 5 s of its start.
        everyone = [*cluster.controlplanes, *cluster.workers, machine.address]
        rows = [r for r in lags(cluster, everyone) if machine.name in (r[0], r[1])]
        worst = max(rows, key=lambda row: row[2])
        print(f"discovery: joiner's slowest pair {worst[0]} -> {worst[1]}: {worst[2]:.2f}s")
        assert worst[2] <= WITHIN, rows
    finally:
        _leave_and_destroy(cluster, machine, record)


def _leave_and_destroy(cluster: LiveCluster, machine: NodeRecord, record: Any) -> None:
    """Take the joiner out of etcd again (the cluster's quorum stays 3 of 3), then stop it."""

    async def leave() -> None:
        client = await cluster.client(machine.address)
        try:
            await client.machine.EtcdLeaveCluster(machine_pb2.EtcdLeaveClusterRequest(), timeout=60)
        finally:
            await client.close()

    with contextlib.suppress(Exception):
        run(leave())
    run(destroy(record))


def test_a_killed_node_runs_out_at_its_ttl_a_stopped_one_leaves_at_once(
    cluster: LiveCluster,
) -> None:
    killed, stopped = (n for n in cluster.record.nodes if n.type == "worker")
    watchers = cluster.controlplanes

    def gone(name: str) -> bool:
        return all(name not in affiliates(cluster, a) for a in watchers)

    _kill(killed)
    took = wait_until(lambda: gone(killed.name), TTL + 6, f"{killed.name} gone", poll=0.25)
    print(f"\ndiscovery: a killed node gone from every list {took:.1f}s after (TTL {TTL:g}s)")
    # It was not deleted: its record ran out (refreshed every ~TTL/3 before the kill).
    assert took >= TTL / 3, took

    os.kill(stopped.launcher_pid, signal.SIGTERM)  # graceful: the node deletes its record
    took = wait_until(lambda: gone(stopped.name), TTL, f"{stopped.name} gone", poll=0.25)
    print(f"discovery: a node shut down gracefully gone {took:.1f}s after")
    assert took < TTL / 2, took


def _kill(node: NodeRecord) -> None:
    os.killpg(node.launcher_pid, signal.SIGKILL)
    for pid in common.processes_naming(node.node_dir.encode() + b"/"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
