"""``basaltctl health`` on a real 3 control plane + 1 worker process cluster with etcd.

Every check passes from the client and on a node (``--server``, the ClusterHealth RPC);
then etcd is stopped on one control plane and both ways exit 1 naming the check and
that node; once it runs again, ``--wait`` sees the cluster healthy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from basalt.machinery.client.config import ClientConfig, issue_client_context, save_client_config
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, start_cluster, stop_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    live = start_cluster(
        tmp_path_factory.mktemp("health"), "health", "127.0.0.221", controlplanes=3, workers=1
    )
    try:
        yield live
    finally:
        stop_cluster(live)


def ctl(
    cluster: LiveCluster, *args: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    path = config or Path(cluster.record.state_dir) / "basaltconfig"
    return subprocess.run(
        [*BASALTCTL, *args],
        env={**os.environ, "BASALTCONFIG": str(path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_all_pass(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    for check in ("all nodes reachable", "etcd members agree", "etcd has one leader"):
        waiting = lines.index(f"waiting for {check} ...")
        assert lines[waiting + 1].startswith(f"{check}: OK"), lines
    assert "all nodes reachable: OK (3 control planes, 1 worker answer)" in lines
    assert "etcd members agree: OK (3 control planes agree on 3 members)" in lines
    assert "same version everywhere: OK" in result.stdout
    # process nodes: container-mode slots, no TimeSyncConfig, no kubelet
    assert "no node on a trial slot or rolled back: OK (4 nodes on a good slot)" in lines
    assert "time in sync: skipped: time sync is off on every node" in result.stdout
    assert "clocks agree: OK (4 clocks within" in result.stdout  # compared all the same
    assert "Kubernetes nodes Ready: skipped: kubelet not running" in lines
    assert "control-plane pods up: skipped: kubelet not running" in lines


def test_every_check_passes_from_the_client(cluster: LiveCluster) -> None:
    # the cluster may still be settling right after creation: --wait rides that out
    assert_all_pass(ctl(cluster, "health", "--wait", "120"))


def test_every_check_passes_on_a_node(cluster: LiveCluster) -> None:
    assert_all_pass(ctl(cluster, "health", "--server", "--wait", "60"))
    second = cluster.controlplanes[1]
    assert_all_pass(ctl(cluster, "health", "--server", "-n", second))


def test_named_nodes_and_a_reader(cluster: LiveCluster, tmp_path: Path) -> None:
    cps = ",".join(cluster.controlplanes)
    named = ctl(
        cluster, "health", "--control-plane-nodes", cps, "--worker-nodes", cluster.workers[0]
    )
    assert_all_pass(named)
    reader = issue_client_context(
        cluster.os_ca, endpoints=[cluster.controlplanes[0]], roles=[Role.READER]
    )
    path = tmp_path / "reader.basaltconfig"
    save_client_config(ClientConfig(context="reader", contexts={"reader": reader}), path)
    assert_all_pass(ctl(cluster, "health", "--server", config=path))
    assert_all_pass(ctl(cluster, "health", config=path))


def test_per_node_checks_stay_a_table(cluster: LiveCluster) -> None:
    result = ctl(cluster, "health", "-n", cluster.workers[0])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:4] == ["NODE", "CHECK", "RESULT", "DETAILS"]
    assert "service apid" in result.stdout


def test_a_stopped_etcd_fails_naming_the_check_and_the_node(cluster: LiveCluster) -> None:
    third = cluster.controlplanes[2]
    stopped = ctl(cluster, "service", "etcd", "stop", "-n", third)
    assert stopped.returncode == 0, stopped.stderr
    try:
        for args in (("health",), ("health", "--server")):
            result = ctl(cluster, *args)
            assert result.returncode == 1, (args, result.stdout, result.stderr)
            assert "all nodes reachable: OK" in result.stdout
            assert "etcd has one leader" not in result.stdout  # nothing after the failure
            error = result.stderr
            assert "cluster health: all nodes healthy (stage, services, controllers): FAILED:" in (
                error
            ), error
            assert f"{third}: service etcd: " in error, error
            assert "Traceback" not in error
    finally:
        started = ctl(cluster, "service", "etcd", "start", "-n", third)
        assert started.returncode == 0, started.stderr
    assert_all_pass(ctl(cluster, "health", "--wait", "120"))
