"""Node certificates: workers get theirs from the trust service with the join token,
renew them before expiry, and a wrong token gets nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.client.client import Client
from basalt.machinery.pki import load_certificate
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster

pytestmark = pytest.mark.integration

VALIDITY = 6.0  # seconds: renewal is due after 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    live = start_cluster(
        tmp_path_factory.mktemp("certs"),
        "certs",
        "127.0.0.151",
        machined_args=("--cert-validity", str(VALIDITY)),
    )
    yield live
    stop_cluster(live)


async def _events(cluster: LiveCluster, address: str) -> list[str]:
    client = await cluster.client(address)
    try:
        return [
            e.message async for e in client.machine.Events(machine_pb2.EventsRequest(), timeout=10)
        ]
    finally:
        await client.close()


def _served_certificate(address: str) -> Any:
    import ssl

    pem = ssl.get_server_certificate((address, 50000), timeout=5)
    return load_certificate(pem)


def test_worker_certificate_is_server_only_and_signed_by_the_os_ca(cluster: LiveCluster) -> None:
    import ssl

    from basalt.machinery.pki import certificate_organizations, verify_issued_by

    pem = ssl.get_server_certificate((cluster.workers[0], 50000), timeout=5)
    assert verify_issued_by(pem, cluster.context.ca)
    assert certificate_organizations(pem) == []  # no role can ever come from the trust service


def test_certificates_renew_before_expiry_and_the_api_keeps_serving(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    first = _served_certificate(worker)

    async def keep_calling(seconds: float) -> int:
        calls = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            client = await cluster.client(worker)  # a new handshake every time
            try:
                await client.machine.Version(common_pb2.Empty(), timeout=5)
                calls += 1
            finally:
                await client.close()
            await asyncio.sleep(0.5)
        return calls

    assert run(keep_calling(VALIDITY + 3)) > 10
    later = _served_certificate(worker)
    assert later.serial_number != first.serial_number
    assert later.not_valid_after_utc > first.not_valid_after_utc
    assert "API certificate renewed" in run(_events(cluster, worker))
    assert "API certificate renewed" in run(_events(cluster, cluster.controlplanes[0]))


def test_wrong_join_token_gets_no_certificate(cluster: LiveCluster, tmp_path: Path) -> None:
    text = cluster.config_text("worker")
    token = next(line.split(": ")[1] for line in text.splitlines() if line.startswith("token: "))
    forged = text.replace(f"token: {token}", "token: aaaaaa.aaaaaaaaaaaaaaaa")
    address = "127.0.0.159"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "basalt.machined",
            "--node-dir",
            str(tmp_path / "n"),
            "--address",
            address,
            "--hostname",
            "intruder",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def attempt() -> str:
        for _ in range(100):
            try:
                client = await Client.connect(address, insecure=True)
                break
            except Exception:
                await asyncio.sleep(0.1)
        try:
            await client.machine.ApplyConfiguration(
                machine_pb2.ApplyConfigurationRequest(data=forged.encode()), timeout=10
            )
        finally:
            await client.close()
        await asyncio.sleep(2.0)
        ready = await cluster.resource(cluster.controlplanes[0], "MachineStatuses", "machine")
        assert ready["ready"]
        return "\n".join(await _events(cluster, cluster.controlplanes[0]))

    try:
        events = run(attempt())
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert "request(s) with a wrong join token from" in events
    assert "intruder" not in events  # nothing was signed for it
