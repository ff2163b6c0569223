"""SystemStats/history on a real node: a one-control-plane process cluster on 127.0.0.170
sampling every half second, read by ``basaltctl get`` with an ``os:reader`` certificate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from basalt.machinery.client.config import ClientConfig, issue_client_context, save_client_config
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, start_cluster, stop_cluster

pytestmark = pytest.mark.integration

ADDRESS = "127.0.0.170"
INTERVAL = 0.5
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    live = start_cluster(
        tmp_path_factory.mktemp("stats"),
        "stats",
        ADDRESS,
        workers=0,
        machined_args=("--stats-interval", str(INTERVAL)),
    )
    yield live
    stop_cluster(live)


def _get_as_reader(cluster: LiveCluster, config: Path) -> dict[str, Any]:
    result = subprocess.run(
        [*BASALTCTL, "get", "SystemStats", "history", "-o", "json", "-n", ADDRESS],
        env={**os.environ, "BASALTCONFIG": str(config)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    record: dict[str, Any] = json.loads(result.stdout)
    return record


def test_a_reader_gets_the_nodes_cpu_and_memory_history(
    cluster: LiveCluster, tmp_path: Path
) -> None:
    context = issue_client_context(cluster.os_ca, endpoints=[ADDRESS], roles=[Role.READER])
    config = tmp_path / "reader-config"
    save_client_config(ClientConfig(context="reader", contexts={"reader": context}), config)

    deadline = time.monotonic() + 30
    while True:
        record = _get_as_reader(cluster, config)
        spec = record["spec"]
        if len(spec["cpu"]) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(INTERVAL)

    assert record["metadata"]["type"] == "SystemStats" and record["metadata"]["id"] == "history"
    assert record["metadata"]["namespace"] == "perf"
    assert set(spec) == {
        "interval",
        "cpu",
        "memory",
        "memoryTotal",
        "times",
        "networkRx",
        "networkTx",
    }
    assert len(spec["networkRx"]) == len(spec["times"])
    assert spec["interval"] == INTERVAL
    assert len(spec["cpu"]) >= 2, spec
    assert len(spec["times"]) == len(spec["cpu"]) == len(spec["memory"])
    assert all(0.0 <= cpu <= 100.0 for cpu in spec["cpu"])
    assert all(0 < used <= spec["memoryTotal"] for used in spec["memory"])
    assert spec["times"] == sorted(spec["times"])
    assert abs(spec["times"][-1] - time.time()) < 60
    gaps = [b - a for a, b in zip(spec["times"], spec["times"][1:], strict=False)]
    assert all(INTERVAL * 0.5 < gap < INTERVAL * 20 for gap in gaps), gaps
