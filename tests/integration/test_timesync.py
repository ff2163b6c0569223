"""Time sync against a real NTP server: Debian's chronyd, on its own loopback address,
with control of the clock disabled (``-x``): it serves the host's time and touches
nothing. The node side is the metal platform's time sync controller, unprivileged, so it
measures and reports but never moves the host's clock."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from basalt.machined.assemble import build_node
from basalt.machined.controllers.timesync import RESOURCE, RESOURCE_ID, TimeSyncController
from basalt.machined.node import Tuning
from basalt.machined.platform.metal import MetalPlatform
from basalt.machinery.config import load_bundle
from tests.fakes.tools import unpacked

HOST = "127.0.0.231"
PORT = 12323


@pytest.fixture(scope="module")
def chronyd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    program = unpacked("chrony", "usr/sbin/chronyd")
    work = tmp_path_factory.mktemp("chrony")
    conf = work / "chrony.conf"
    conf.write_text(
        f"port {PORT}\nbindaddress {HOST}\ncmdport 0\nlocal stratum 8\n"
        f"allow 127.0.0.0/8\npidfile {work}/chronyd.pid\n"
    )
    proc = subprocess.Popen(
        [str(program), "-x", "-d", "-u", "root", "-f", str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(0.5)
    if proc.poll() is not None:
        pytest.fail(f"chronyd did not start: {proc.stdout.read() if proc.stdout else ''}")
    yield HOST
    proc.terminate()
    proc.wait(timeout=10)


def test_node_syncs_with_chronyd_and_reports_it(chronyd: str, tmp_path: Path) -> None:
    async def run() -> None:
        platform = MetalPlatform.create(address="127.0.0.9", hostname="n1", root=tmp_path)
        assert not platform.init  # never the host's clock
        node = build_node(platform, Tuning(ntp_port=PORT, time_poll_min=0.3, time_poll_max=0.6))
        node.use_config(
            load_bundle(
                f"apiVersion: basalt.dev/v1alpha1\nkind: TimeSyncConfig\nservers: [{chronyd}]\n",
                "test",
            )
        )
        controller = TimeSyncController(node)
        await controller.reconcile(node.store)
        await asyncio.wait_for(controller.synced.wait(), 10)
        status = node.store.get(RESOURCE, RESOURCE_ID)
        assert status is not None
        spec = status.spec
        assert spec.synced and spec.server == HOST and spec.stratum == 9 - 1
        assert spec.adjustment == "none"  # observed only: not PID 1
        assert abs(spec.offset) < 0.05 and 0 <= spec.delay < 0.5

    asyncio.run(run())
