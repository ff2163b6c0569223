"""``basaltctl dashboard`` against real nodes: a process cluster (one control plane, one
worker) on 127.0.121.10-11 and a real ``basalt-fleet`` on 127.0.121.20.

Headless with Textual's pilot and the real sources (mTLS gRPC, the fleet's REST API),
and once as a person runs it: ``basaltctl dashboard`` in a detached tmux session whose
screen is captured and read.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from basalt.cli.dashboard.app import DashboardApp, ServicePicker
from basalt.cli.dashboard.source import FleetAPISource, NodeAPISource
from basalt.cli.dashboard.widgets import LogPanel, ServicesTable
from basalt.machinery.client.client import Client
from basalt.machinery.client.config import (
    ClientConfig,
    issue_client_context,
    load_client_config,
    save_client_config,
)
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, start_cluster, stop_cluster
from tests.fakes.fleet import FleetProcess

pytestmark = pytest.mark.integration

BASE = "127.0.121.10"
FLEET_HOST = "127.0.121.20"
_SCRIPT = Path(sys.executable).with_name("basaltctl")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    live = start_cluster(
        tmp_path_factory.mktemp("dashboard"),
        "dashboard",
        BASE,
        machined_args=("--stats-interval", "0.5"),
    )
    try:
        asyncio.run(live.wait_ready(live.controlplanes[0]))
        asyncio.run(live.wait_ready(live.workers[0]))
        yield live
    finally:
        stop_cluster(live)


async def until(pilot: Any, check: Callable[[], bool], what: str, timeout: float = 45) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.2)


def test_dashboard_shows_real_nodes_switches_node_and_service_log(cluster: LiveCluster) -> None:
    cp, worker = cluster.controlplanes[0], cluster.workers[0]

    async def connect() -> Client:
        return await cluster.client(cp, nodes=[cp, worker])

    source = NodeAPISource(connect, [cp, worker])
    app = DashboardApp(source, interval=1.0)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: cp in app.snapshots, "the control plane's first poll")
            await until(
                pilot,
                lambda: (
                    app.snapshots[cp].summary.etcd == "leader"
                    and len(app.snapshots[cp].cpu_history) >= 2
                ),
                "etcd leadership and CPU samples",
            )
            snap = app.snapshots[cp]
            assert snap.summary.version and snap.summary.machine_type == "controlplane"
            assert snap.summary.addresses and snap.summary.stage == "running"
            assert len(snap.network_rx_history) == len(snap.cpu_history)
            assert any(p.command for p in snap.processes)
            assert not snap.errors, snap.errors
            services = {s.id for s in snap.services}
            assert "etcd" in services
            assert app.query_one(ServicesTable).row_count == len(services)
            await until(pilot, lambda: bool(app.query_one(LogPanel).lines), "machined's log")

            await pilot.press("right_square_bracket")
            await until(pilot, lambda: worker in app.snapshots, "the worker's first poll")
            await until(
                pilot,
                lambda: app.snapshots[worker].summary.hostname != "",
                "the worker's summary",
            )
            wsnap = app.snapshots[worker]
            assert app.current == worker
            assert wsnap.summary.machine_type == "worker"
            assert wsnap.summary.etcd == "none (worker)" and "etcd" not in wsnap.errors
            assert wsnap.summary.hostname != snap.summary.hostname
            await until(pilot, lambda: bool(app.query_one(LogPanel).lines), "the worker's log")

            # The service picker: pick the worker's first service, its log is followed.
            wanted = sorted(s.id for s in wsnap.services)[0]
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, ServicePicker), "the picker")
            await pilot.press("home", "enter")
            await until(pilot, lambda: app.log_service == wanted, f"the log of {wanted}")
            await pilot.pause(2)
            lines = app.query_one(LogPanel).lines
            assert not any("ended:" in line for line in lines), lines
            app.save_screenshot("dashboard-real.svg", str(cluster.record.state_dir))
            await pilot.press("q")

    asyncio.run(main())
    svg = (Path(cluster.record.state_dir) / "dashboard-real.svg").read_text()
    assert worker.replace(".", "") in svg.replace(".", "")


def test_dashboard_under_tmux_shows_the_node_and_quits_on_q(
    cluster: LiveCluster, tmp_path: Path
) -> None:
    if shutil.which("tmux") is None:
        if os.geteuid() == 0:
            raise AssertionError("tmux is missing: 'make system-deps' installs it")
        pytest.skip("tmux is not installed (make system-deps installs it as root)")
    cp = cluster.controlplanes[0]
    context = issue_client_context(cluster.os_ca, endpoints=[cp], roles=[Role.READER])
    config = tmp_path / "reader-config"
    save_client_config(ClientConfig(context="reader", contexts={"reader": context}), config)
    basaltctl = str(_SCRIPT) if _SCRIPT.exists() else f"{sys.executable} -m basalt.cli.main"
    command = f"{basaltctl} --basaltconfig {shlex.quote(str(config))} dashboard -n {cp}"
    # A tmux server of our own (its own socket), so nothing else's sessions are touched.
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    session = "dashboard"
    env = {**os.environ, "TERM": "xterm-256color"}
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", session, "-x", "160", "-y", "48", command],
        check=True,
        env=env,
        timeout=30,
    )
    screen = ""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", session],
                capture_output=True, text=True, timeout=10, check=False,
            ).stdout  # fmt: skip
            if cp in screen and "etcd" in screen and "apid" in screen and "running" in screen:
                break
            time.sleep(0.5)
        (tmp_path / "screen.txt").write_text(screen)
        assert cp in screen, screen
        for expected in ("etcd", "apid", "summary", "services", "processes", "logs: machined"):
            assert expected in screen, (expected, screen)
        subprocess.run([*tmux, "send-keys", "-t", session, "q"], check=True, timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            alive = subprocess.run(
                [*tmux, "has-session", "-t", session], capture_output=True, timeout=10, check=False
            )
            if alive.returncode != 0:
                break
            time.sleep(0.2)
        assert alive.returncode != 0, "basaltctl dashboard did not exit on q"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10, check=False)


def test_fleet_view_reads_a_real_fleet(tmp_path: Path) -> None:
    fleet = FleetProcess(tmp_path / "fleet", FLEET_HOST, 18461, tmp_path / "fleet.log")
    fleet.data_dir.mkdir()
    fleet.start()
    try:
        fleet.login()
        login = load_client_config(fleet.client_config).fleet
        assert login is not None
        app = DashboardApp(None, FleetAPISource(login), interval=1.0)

        async def main() -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                await until(pilot, lambda: app.fleet_snapshot is not None, "the fleet's answer")
                assert app.fleet_snapshot is not None
                assert app.fleet_snapshot.error == "", app.fleet_snapshot.error
                assert app.fleet_snapshot.url == fleet.url
                assert app.fleet_snapshot.clusters == [] and app.fleet_snapshot.rollouts == []
                await pilot.press("q")

        asyncio.run(main())

        # A wrong token is shown as the fleet's refusal, and the app keeps running.
        bad = type(login)(url=login.url, token="not-a-token", ca=login.ca)
        app = DashboardApp(None, FleetAPISource(bad), interval=1.0)

        async def refused() -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                await until(pilot, lambda: app.fleet_snapshot is not None, "the fleet's refusal")
                assert app.fleet_snapshot is not None
                assert app.fleet_snapshot.error.startswith("fleet:"), app.fleet_snapshot.error
                assert "not-a-token" not in app.fleet_snapshot.error
                assert app.is_running

        asyncio.run(refused())
    finally:
        fleet.stop()
