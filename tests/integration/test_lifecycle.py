"""Config applies, sequences and reboots on real node processes.

Bad configs change nothing; modes behave as documented; one sequence at a time; a
trial config reverts by itself; reboot and reset loops bring the node back each time.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml

from basalt.machinery.api import common_pb2, machine_pb2
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster

pytestmark = pytest.mark.integration

HOSTNAME_PATCH = "apiVersion: basalt.dev/v1alpha1\nkind: HostnameConfig\nhostname: {name}\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    live = start_cluster(tmp_path_factory.mktemp("lifecycle"), "life", "127.0.0.111")
    yield live
    stop_cluster(live)


def committed(cluster: LiveCluster, address: str) -> str:
    return (cluster.node_dir(address) / "system" / "state" / "config.yaml").read_text()


async def apply(
    cluster: LiveCluster, address: str, text: str, mode: str = "AUTO", **extra: Any
) -> machine_pb2.ApplyConfiguration:
    client = await cluster.client(address)
    try:
        answer = await client.machine.ApplyConfiguration(
            machine_pb2.ApplyConfigurationRequest(
                data=text.encode(), mode=machine_pb2.ApplyMode.Value(mode), **extra
            ),
            timeout=30,
        )
        return answer.messages[0]
    finally:
        await client.close()


async def running_config(cluster: LiveCluster, address: str) -> str:
    spec = await cluster.resource(address, "MachineConfigs", "v1alpha1")
    return str(spec["yaml"])


def with_document(config: str, document: str) -> str:
    return config.rstrip("\n") + "\n---\n" + document


def test_bad_config_is_refused_with_every_error_and_changes_nothing(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    before_file = committed(cluster, worker)
    before_running = run(running_config(cluster, worker))
    broken = cluster.config_text("worker").replace("dnsDomain: cluster.local", "dnsDomain: Bad_")
    broken = with_document(
        broken,
        "apiVersion: basalt.dev/v1alpha1\nkind: LinkConfig\n"
        "name: eth0\nmtu: 10\naddresses: [10.0.0.1]\n",
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        run(apply(cluster, worker, broken))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert "3 errors found" in details
    assert "ClusterConfig.network.dnsDomain" in details
    assert "LinkConfig(eth0).mtu: must be at least 68" in details
    assert "LinkConfig(eth0).addresses[0]: '10.0.0.1' has no prefix length" in details
    assert committed(cluster, worker) == before_file
    assert run(running_config(cluster, worker)) == before_running


def test_no_reboot_refuses_reboot_changes_listing_fields(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    before = committed(cluster, worker)
    changed = cluster.config_text("worker").replace("v1.34.1", "v1.34.2")
    changed = changed.replace("- 10.96.0.0/12", "- 10.97.0.0/16")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        run(apply(cluster, worker, changed, "NO_REBOOT"))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = raised.value.details() or ""
    assert "ClusterConfig.network.serviceSubnets" in details
    assert "ClusterConfig.kubernetes.version" in details
    assert committed(cluster, worker) == before


def test_dry_run_shows_a_diff_and_the_mode_and_changes_nothing(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    before = committed(cluster, worker)
    text = with_document(run(running_config(cluster, worker)), HOSTNAME_PATCH.format(name="dry"))
    answer = run(apply(cluster, worker, text, "AUTO", dry_run=True))
    assert answer.mode == machine_pb2.NO_REBOOT
    assert "chose no-reboot" in answer.mode_details
    assert "+++ b/HostnameConfig" in answer.diff and "+hostname: dry" in answer.diff
    assert committed(cluster, worker) == before


def test_auto_applies_live_changes_without_reboot(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    base = run(running_config(cluster, worker))
    text = with_document(base, HOSTNAME_PATCH.format(name="renamed-worker"))
    answer = run(apply(cluster, worker, text))
    assert answer.mode == machine_pb2.NO_REBOOT
    assert "hostname: renamed-worker" in committed(cluster, worker)
    spec = run(cluster.resource(worker, "Hostnames", "hostname"))
    assert spec["hostname"] == "renamed-worker"
    run(apply(cluster, worker, base))  # and back
    assert run(cluster.resource(worker, "Hostnames", "hostname"))["hostname"] != "renamed-worker"


def test_try_reverts_after_its_timeout_and_never_commits(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    before = committed(cluster, worker)
    base = run(running_config(cluster, worker))
    text = with_document(base, HOSTNAME_PATCH.format(name="trial"))
    answer = run(apply(cluster, worker, text, "TRY", try_timeout_seconds=2))
    assert "reverts in 2s" in answer.mode_details
    assert run(cluster.resource(worker, "Hostnames", "hostname"))["hostname"] == "trial"
    assert committed(cluster, worker) == before

    async def wait_revert() -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            spec = await cluster.resource(worker, "Hostnames", "hostname")
            if spec["hostname"] != "trial":
                return str(spec["hostname"])
            await asyncio.sleep(0.2)
        raise AssertionError("trial config was not reverted")

    run(wait_revert())
    assert run(running_config(cluster, worker)) == base
    assert committed(cluster, worker) == before


def test_try_then_confirm_commits(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    base = run(running_config(cluster, worker))
    text = with_document(base, HOSTNAME_PATCH.format(name="confirmed"))
    run(apply(cluster, worker, text, "TRY", try_timeout_seconds=30))
    answer = run(apply(cluster, worker, text, "NO_REBOOT"))
    assert "confirmed" in answer.mode_details
    assert "hostname: confirmed" in committed(cluster, worker)
    run(apply(cluster, worker, base))


def test_conflicting_sequence_is_refused_naming_the_running_one(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    text = committed(cluster, worker)

    async def race() -> grpc.aio.AioRpcError:
        client = await cluster.client(worker)
        try:
            await client.machine.Reboot(machine_pb2.RebootRequest(), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.machine.ApplyConfiguration(
                    machine_pb2.ApplyConfigurationRequest(data=text.encode()), timeout=10
                )
            return raised.value
        finally:
            await client.close()

    error = run(race())
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "sequence 'reboot' is running" in (error.details() or "")
    run(cluster.wait_ready(worker))


def test_staged_config_takes_effect_at_next_reboot(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    base = run(running_config(cluster, worker))
    before = committed(cluster, worker)
    staged = with_document(base, HOSTNAME_PATCH.format(name="after-reboot"))
    answer = run(apply(cluster, worker, staged, "STAGED"))
    assert answer.mode == machine_pb2.STAGED
    assert committed(cluster, worker) == before
    assert run(cluster.resource(worker, "Hostnames", "hostname"))["hostname"] != "after-reboot"
    assert run(cluster.resource(worker, "MachineConfigs", "staged"))["staged"] is True
    reboot(cluster, worker)
    assert run(cluster.resource(worker, "Hostnames", "hostname"))["hostname"] == "after-reboot"
    assert "hostname: after-reboot" in committed(cluster, worker)
    run(apply(cluster, worker, base))


def reboot(cluster: LiveCluster, address: str) -> None:
    async def go() -> None:
        client = await cluster.client(address)
        try:
            await client.machine.Reboot(machine_pb2.RebootRequest(), timeout=10)
        finally:
            await client.close()
        await asyncio.sleep(0.5)
        await cluster.wait_ready(address)

    run(go())


def boots(cluster: LiveCluster, address: str) -> int:
    log = (cluster.node_dir(address) / "console.log").read_text()
    return log.count("launcher: boot ")


def test_reboot_loop_keeps_config_and_comes_back(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    config = committed(cluster, worker)
    first = boots(cluster, worker)
    for _ in range(3):
        reboot(cluster, worker)
        assert committed(cluster, worker) == config
    assert boots(cluster, worker) == first + 3
    version = run(_version(cluster, worker))
    assert version.mode == "normal"


async def _version(cluster: LiveCluster, address: str) -> machine_pb2.VersionInfo:
    client = await cluster.client(address)
    try:
        return (await client.machine.Version(common_pb2.Empty(), timeout=10)).messages[0]
    finally:
        await client.close()


def test_reset_loop_returns_to_maintenance_and_reinstalls(cluster: LiveCluster) -> None:
    from basalt.machinery.client.client import Client

    worker = cluster.workers[0]
    marker = cluster.node_dir(worker) / "var" / "lib" / "marker"
    for _ in range(2):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("ephemeral data")

        async def reset() -> None:
            client = await cluster.client(worker)
            try:
                await client.machine.Reset(
                    machine_pb2.ResetRequest(graceful=True, wipe_mode=machine_pb2.ALL, reboot=True),
                    timeout=10,
                )
            finally:
                await client.close()

        async def back_in_maintenance() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    client = await Client.connect(worker, insecure=True)
                    try:
                        answer = await client.machine.Version(common_pb2.Empty(), timeout=2)
                        if answer.messages[0].mode == "maintenance":
                            return
                    finally:
                        await client.close()
                except Exception:
                    pass
                await asyncio.sleep(0.2)
            raise AssertionError("node did not come back in maintenance mode")

        run(reset())
        run(back_in_maintenance())
        assert not (cluster.node_dir(worker) / "system" / "state" / "config.yaml").exists()
        assert not marker.exists()

        async def reinstall() -> None:
            client = await Client.connect(worker, insecure=True)
            try:
                await client.machine.ApplyConfiguration(
                    machine_pb2.ApplyConfigurationRequest(
                        data=cluster.config_text("worker").encode()
                    ),
                    timeout=10,
                )
            finally:
                await client.close()
            await cluster.wait_ready(worker)

        run(reinstall())


def test_reset_ephemeral_only_keeps_the_config(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    config = committed(cluster, worker)
    marker = cluster.node_dir(worker) / "var" / "lib" / "marker2"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("x")

    async def reset() -> None:
        client = await cluster.client(worker)
        try:
            await client.machine.Reset(
                machine_pb2.ResetRequest(wipe_mode=machine_pb2.EPHEMERAL, reboot=True), timeout=10
            )
        finally:
            await client.close()
        await asyncio.sleep(0.5)
        await cluster.wait_ready(worker)

    run(reset())
    assert committed(cluster, worker) == config
    assert not marker.exists()


def test_events_record_sequences_and_config(cluster: LiveCluster) -> None:
    async def events() -> list[machine_pb2.Event]:
        client = await cluster.client()
        try:
            return [e async for e in client.machine.Events(machine_pb2.EventsRequest(), timeout=10)]
        finally:
            await client.close()

    messages = [e.message for e in run(events())]
    assert "boot: started" in messages and "boot: finished" in messages
    assert "config applied in maintenance mode" in messages


def test_watch_sees_a_live_change(cluster: LiveCluster) -> None:
    from basalt.machinery.api import resource_pb2

    worker = cluster.workers[0]
    base = run(running_config(cluster, worker))

    async def watch_and_change() -> list[str]:
        client = await cluster.client(worker)
        seen: list[str] = []
        try:
            stream = client.resources.Watch(
                resource_pb2.ResourceWatchRequest(type="Hostnames", tail=True), timeout=20
            )
            async for event in stream:
                if event.event == resource_pb2.BOOTSTRAPPED:
                    await apply(
                        cluster, worker, with_document(base, HOSTNAME_PATCH.format(name="watched"))
                    )
                    continue
                seen.append(json.loads(event.resource.spec_json)["hostname"])
                if seen[-1] == "watched":
                    stream.cancel()
                    break
        finally:
            await client.close()
        return seen

    assert run(watch_and_change())[-1] == "watched"
    run(apply(cluster, worker, base))


def test_node_dir_layout(cluster: LiveCluster) -> None:
    node_dir: Path = cluster.node_dir(cluster.controlplanes[0])
    state = node_dir / "system" / "state"
    assert (state / "config.yaml").stat().st_mode & 0o777 == 0o600
    assert yaml.safe_load_all((state / "config.yaml").read_text())
