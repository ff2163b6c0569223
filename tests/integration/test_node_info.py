"""stats, cgroups, time, usage and containers ps against a real process node: a real
machined over real mTLS, the installed basaltctl in a subprocess, a real SNTP exchange
with a server on a loopback address, real cgroups, and (as root, with Debian's
containerd and runc) a real container whose task is listed and measured."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.client.config import ClientConfig, issue_client_context, save_client_config
from basalt.machinery.config import parse_patch
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster
from tests.fakes.oci import SPIN, oci_layout_tar
from tests.fakes.sntp import FakeSntpServer

pytestmark = pytest.mark.integration

BASE_ADDRESS = "127.0.0.151"
SNTP_HOST = "127.0.0.159"
SILENT_HOST = "127.0.0.158"
SKEW = 5.0
ROOT = os.geteuid() == 0
CONTAINERD = ROOT and bool(shutil.which("containerd") and shutil.which("runc"))
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]
IMAGE = "example.org/basalt/spin:1"


@pytest.fixture(scope="module")
def sntp() -> Iterator[FakeSntpServer]:
    # The node asks its configured servers on port 123: only root may serve there.
    server = FakeSntpServer(SNTP_HOST, skew=SKEW, port_wanted=123 if ROOT else 0)
    yield server
    server.close()


@pytest.fixture(scope="module")
def cluster(sntp: FakeSntpServer) -> Iterator[LiveCluster]:
    # Unix socket paths are short (108 bytes): keep the node dirs near the root.
    tmp = Path(tempfile.mkdtemp(prefix="binfo-", dir="/tmp"))
    patch = parse_patch(
        "apiVersion: basalt.dev/v1alpha1\nkind: TimeSyncConfig\n"
        f"servers: [{SNTP_HOST}]\nbootTimeoutSeconds: 0\n",
        "time",
    )
    saved = os.environ.get("BASALT_CONTAINERD")
    if CONTAINERD:
        os.environ["BASALT_CONTAINERD"] = "1"
    try:
        live = start_cluster(tmp, "info", BASE_ADDRESS, workers=0, patches=(patch,))
    finally:
        if saved is None:
            os.environ.pop("BASALT_CONTAINERD", None)
        else:
            os.environ["BASALT_CONTAINERD"] = saved
    try:
        yield live
    finally:
        stop_cluster(live)
        shutil.rmtree(tmp, ignore_errors=True)


def ctl(
    cluster: LiveCluster, *args: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    config = config or Path(cluster.record.state_dir) / "basaltconfig"
    return subprocess.run(
        [*BASALTCTL, *args],
        env={**os.environ, "BASALTCONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(cluster: LiveCluster, *args: str) -> str:
    result = ctl(cluster, *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


# -- usage -----------------------------------------------------------------------------


def _usage_lines(out: str) -> dict[str, int]:
    return {line.split()[1]: int(line.split()[0]) for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def tree(cluster: LiveCluster) -> str:
    """/var/usagedemo with known sizes; a/b/hl is a hard link to c/three.bin (met first,
    so counted there), d a symlink to / (4 bytes: never followed)."""
    base = cluster.node_dir(cluster.controlplanes[0]) / "var" / "usagedemo"
    (base / "a" / "b").mkdir(parents=True)
    (base / "c").mkdir()
    (base / "a" / "one.bin").write_bytes(b"1" * 1000)
    (base / "a" / "b" / "two.bin").write_bytes(b"2" * 3000)
    (base / "c" / "three.bin").write_bytes(b"3" * 50_000)
    os.link(base / "c" / "three.bin", base / "a" / "b" / "hl")
    os.symlink("/etc", base / "d")
    return "/var/usagedemo"


def test_usage_totals_count_hard_links_once_and_never_follow_links(
    cluster: LiveCluster, tree: str
) -> None:
    total = _usage_lines(ok(cluster, "usage", tree, "--bytes"))
    assert total == {tree: 1000 + 3000 + 50_000 + 4}

    levels = _usage_lines(ok(cluster, "usage", tree, "--bytes", "--depth", "1"))
    assert levels == {f"{tree}/a": 54_000, f"{tree}/c": 0, tree: 54_004}

    everything = _usage_lines(ok(cluster, "usage", tree, "--bytes", "-d", "-1", "--all"))
    assert everything == {
        f"{tree}/a/b/hl": 50_000,
        f"{tree}/a/b/two.bin": 3000,
        f"{tree}/a/b": 53_000,
        f"{tree}/a/one.bin": 1000,
        f"{tree}/a": 54_000,
        f"{tree}/c": 0,  # its file was counted under a/b/hl
        f"{tree}/d": 4,
        tree: 54_004,
    }
    human = ok(cluster, "usage", tree)
    assert human.split() == ["52.7KiB", tree]


def test_usage_threshold_keeps_big_or_small_entries(cluster: LiveCluster, tree: str) -> None:
    big = _usage_lines(ok(cluster, "usage", tree, "--bytes", "-d", "-1", "--threshold", "50K"))
    assert big == {f"{tree}/a/b": 53_000, f"{tree}/a": 54_000, tree: 54_004}
    small = _usage_lines(ok(cluster, "usage", tree, "--bytes", "-d", "-1", "--threshold=-1K"))
    assert small == {f"{tree}/c": 0}

    bad = ctl(cluster, "usage", tree, "--threshold", "lots")
    assert bad.returncode == 1 and "--threshold 'lots' is not a size" in bad.stderr


def test_usage_refuses_missing_and_secret_paths(cluster: LiveCluster, tmp_path: Path) -> None:
    node = cluster.controlplanes[0]
    missing = ctl(cluster, "usage", "/var/no-such-dir")
    assert missing.returncode == 1
    assert f"{node}: NOT_FOUND" in missing.stderr and "/var/no-such-dir" in missing.stderr

    context = issue_client_context(cluster.os_ca, endpoints=[node], roles=[Role.READER])
    reader = tmp_path / "reader"
    save_client_config(ClientConfig(context="r", contexts={"r": context}), reader)
    denied = ctl(cluster, "usage", "/system/secrets", config=reader)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    # a reader sees /system's size without what the secrets hold, and is told so
    partial = ctl(cluster, "usage", "/system", "-d", "1", config=reader)
    assert partial.returncode == 0, partial.stderr
    assert "/system/secrets: not counted: sensitive path" in partial.stderr


# -- time ------------------------------------------------------------------------------


def test_time_check_reports_the_offset_of_a_given_server(
    cluster: LiveCluster, sntp: FakeSntpServer
) -> None:
    async def check() -> machine_pb2.TimeCheck:
        client = await cluster.client()
        try:
            request = machine_pb2.TimeCheckRequest(server=f"{SNTP_HOST}:{sntp.port}")
            answer = await client.machine.TimeCheck(request, timeout=30)
            return answer.messages[0]
        finally:
            await client.close()

    checked = run(check())
    (sample,) = checked.samples
    assert not sample.error, sample.error
    assert abs(sample.offset_seconds - SKEW) < 0.5
    assert 0 <= sample.round_trip_seconds < 1 and sample.stratum == 2
    assert abs(checked.node_time - time.time()) < 30

    out = ok(cluster, "time", "--check", f"{SNTP_HOST}:{sntp.port}")
    (row,) = [line.split() for line in out.splitlines() if SNTP_HOST in line]
    assert row[2] == f"{SNTP_HOST}:{sntp.port}"
    assert 4500 < float(row[3].removesuffix("ms")) < 5500


def test_time_fails_when_no_server_answers_and_refuses_bad_servers(
    cluster: LiveCluster,
) -> None:
    silent = FakeSntpServer(SILENT_HOST, behaviour="silent")
    try:
        result = ctl(cluster, "time", "--check", f"{SILENT_HOST}:{silent.port}")
    finally:
        silent.close()
    assert result.returncode == 1
    assert "no answer within" in result.stdout and "no time server answered" in result.stderr

    for bad, why in [("not a host!", "is not HOST[:PORT]"), ("ntp.example:99999", "port")]:
        refused = ctl(cluster, "time", "--check", bad)
        assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr, refused
        assert why in refused.stderr


@pytest.mark.skipif(not ROOT, reason="the node's configured server listens on port 123 (root)")
def test_time_without_check_asks_the_configured_servers(cluster: LiveCluster) -> None:
    out = ok(cluster, "time")
    (row,) = [line.split() for line in out.splitlines() if SNTP_HOST in line]
    assert row[2] == SNTP_HOST and 4500 < float(row[3].removesuffix("ms")) < 5500


# -- cgroups ---------------------------------------------------------------------------


def _pids_hierarchy() -> Path | None:
    v1 = Path("/sys/fs/cgroup/pids")
    if (v1 / "cgroup.procs").exists():
        return v1
    v2 = Path("/sys/fs/cgroup")
    try:
        if "pids" in (v2 / "cgroup.subtree_control").read_text().split():
            return v2
    except OSError:
        pass
    return None


def test_cgroups_by_preset_and_errors(cluster: LiveCluster) -> None:
    async def cgroups(preset: str, path: str = "") -> machine_pb2.Cgroups:
        client = await cluster.client()
        try:
            request = machine_pb2.CgroupsRequest(preset=preset, path=path)
            return (await client.machine.Cgroups(request, timeout=60)).messages[0]
        finally:
            await client.close()

    answer = run(cgroups("pids"))
    assert answer.preset == "pids" and answer.cgroups
    assert {k for c in answer.cgroups for k in c.values} <= {"pids.current", "pids.max"}

    async def refused(preset: str, path: str = "") -> grpc.aio.AioRpcError:
        client = await cluster.client()
        try:
            request = machine_pb2.CgroupsRequest(preset=preset, path=path)
            await client.machine.Cgroups(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return exc
        finally:
            await client.close()
        raise AssertionError("accepted")

    unknown = run(refused("disk"))
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cpu, memory, io, pids" in (unknown.details() or "")
    missing = run(refused("pids", "no/such/cgroup"))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    climbing = run(refused("pids", "../etc"))
    assert climbing.code() == grpc.StatusCode.INVALID_ARGUMENT

    bad = ctl(cluster, "cgroups", "--preset", "disk")
    assert bad.returncode == 1 and "unknown cgroup preset 'disk'" in bad.stderr


@pytest.mark.skipif(not ROOT, reason="making a cgroup needs root")
def test_cgroups_pids_counts_the_processes_of_a_cgroup(cluster: LiveCluster) -> None:
    hierarchy = _pids_hierarchy()
    if hierarchy is None:
        pytest.skip("no pids controller on this host")
    name = f"basalt-info-{os.getpid()}"
    group = hierarchy / name
    group.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (group / "cgroup.procs").write_text(str(sleeper.pid))
        out = ok(cluster, "cgroups", "--preset", "pids", "--path", name)
        lines = [line.split() for line in out.splitlines()[1:] if line.strip()]
        assert lines == [[cluster.controlplanes[0], name, "1", "max"]], out
    finally:
        sleeper.kill()
        sleeper.wait()
        for _ in range(50):  # the cgroup empties when the kernel has reaped the process
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


# -- containers ------------------------------------------------------------------------


async def _import(cluster: LiveCluster) -> None:
    from basalt.machinery.client.client import upload

    async def chunks() -> AsyncIterator[machine_pb2.ImageImportRequest]:
        data = oci_layout_tar(IMAGE, {"/spin": (b"spinning\n", SPIN)}, ["/spin"])
        yield machine_pb2.ImageImportRequest(options=machine_pb2.ImageImportOptions(name=IMAGE))
        for start in range(0, len(data), 65536):
            yield machine_pb2.ImageImportRequest(data=data[start : start + 65536])

    client = await cluster.client()
    try:
        await upload(client.machine.ImageImport, chunks(), timeout=60)
    finally:
        await client.close()


async def _wait_containerd(cluster: LiveCluster) -> None:
    client = await cluster.client()
    try:
        for _ in range(150):
            answer = await client.machine.ServiceList(common_pb2.Empty(), timeout=10)
            found = {s.id: s for s in answer.messages[0].services}
            service = found.get("containerd")
            if service and service.state == "running" and service.health == "healthy":
                return
            await asyncio.sleep(0.2)
        raise TimeoutError("containerd did not become healthy")
    finally:
        await client.close()


@pytest.mark.skipif(not CONTAINERD, reason="containers need root and containerd + runc")
def test_containers_ps_and_stats_see_a_running_task(cluster: LiveCluster) -> None:
    node = cluster.controlplanes[0]

    async def scenario() -> None:
        await _wait_containerd(cluster)
        await _import(cluster)
        client = await cluster.client()
        try:
            running = asyncio.ensure_future(
                client.machine.ContainerRun(
                    machine_pb2.ContainerRunRequest(image=IMAGE, timeout_seconds=20), timeout=120
                )
            )
            found = None
            for _ in range(100):
                answer = await client.machine.Containers(
                    machine_pb2.ContainersRequest(), timeout=30
                )
                found = next(
                    (c for c in answer.messages[0].containers if c.status == "running"), None
                )
                if found:
                    break
                await asyncio.sleep(0.2)
            assert found is not None, "the container never ran"
            assert found.namespace == "basalt" and found.image == IMAGE and found.pid > 0
            assert found.id.startswith("run-") and not found.pod
            cmdline = Path(f"/proc/{found.pid}/cmdline").read_bytes()
            assert cmdline.startswith(b"/spin"), cmdline

            await asyncio.sleep(0.5)  # it spins: let it use some CPU
            stats = await client.machine.Stats(machine_pb2.StatsRequest(), timeout=30)
            (stat,) = [s for s in stats.messages[0].stats if s.id == found.id]
            assert stat.memory_usage > 0 and stat.cpu_usage_ns > 10_000_000 and stat.pids >= 1

            # through the CLI, while it still runs
            listing = await asyncio.to_thread(ok, cluster, "containers", "ps")
            (row,) = [line.split() for line in listing.splitlines() if found.id in line]
            assert row == [node, "basalt", "-", "-", found.id, IMAGE, str(found.pid), "running"]
            assert found.id not in await asyncio.to_thread(ok, cluster, "containers", "ps", "-k")
            table = await asyncio.to_thread(ok, cluster, "stats", "--interval", "0.5")
            (row,) = [line.split() for line in table.splitlines() if found.id in line]
            assert row[:4] == [node, "basalt", "-", found.id]
            assert float(row[-1].removesuffix("%")) > 20  # a busy loop: most of a CPU

            ran = await running
            assert ran.messages[0].timed_out
        finally:
            await client.close()

    run(scenario())

    both = ctl(cluster, "containers", "ps", "-k", "--namespace", "basalt")
    assert both.returncode == 1 and "contradicts" in both.stderr
    bad = ctl(cluster, "stats", "--namespace", "no such")
    assert bad.returncode == 1 and "not a containerd namespace name" in bad.stderr


@pytest.mark.skipif(not CONTAINERD, reason="containers need root and containerd + runc")
def test_containers_ps_names_kubernetes_pods_from_cri_labels(cluster: LiveCluster) -> None:
    """A container record as the CRI plugin makes them (namespace k8s.io, its labels),
    written into the node's containerd directly: listed with its pod and name, no task."""
    from google.protobuf import any_pb2

    from basalt.machined.containerd.client import ContainerdClient
    from basalt.machinery.api.containerd import containers_pb2

    node = cluster.controlplanes[0]
    socket = cluster.node_dir(node) / "var" / "run" / "containerd" / "containerd.sock"
    labels = {
        "io.kubernetes.pod.name": "coredns-5d78c9869d-abcde",
        "io.kubernetes.container.name": "coredns",
        "io.kubernetes.pod.namespace": "kube-system",
    }
    record = containers_pb2.Container(
        id="0123456789abcdef",
        image="registry.k8s.io/coredns/coredns:v1.10.1",
        labels=labels,
        runtime=containers_pb2.Container.Runtime(name="io.containerd.runc.v2"),
        spec=any_pb2.Any(
            type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec", value=b"{}"
        ),
    )

    async def write(create: bool) -> None:
        await _wait_containerd(cluster)
        async with ContainerdClient(socket, namespace="k8s.io") as client:
            if create:
                request = containers_pb2.CreateContainerRequest(container=record)
                await client.call(client.containers.Create, request)
            else:
                request_ = containers_pb2.DeleteContainerRequest(id=record.id)
                await client.call(client.containers.Delete, request_)

    run(write(True))
    try:
        for args in (["-k"], ["--namespace", "k8s.io"], []):
            out = ok(cluster, "containers", "ps", *args)
            (row,) = [line.split() for line in out.splitlines() if record.id in line]
            assert row == [
                node,
                "k8s.io",
                "coredns-5d78c9869d-abcde",
                "coredns",
                record.id,
                record.image,
                "-",
                "(no",
                "task)",
            ]
        assert record.id not in ok(cluster, "containers", "ps", "--namespace", "basalt")
        # no task, nothing to measure
        assert record.id not in ok(cluster, "stats", "-k")
    finally:
        run(write(False))


def test_containers_ps_without_containerd_is_unavailable(cluster: LiveCluster) -> None:
    """Runs last: where the node runs containerd, it stops it first."""

    async def stop() -> None:
        client = await cluster.client()
        try:
            await _wait_containerd(cluster)
            request = machine_pb2.ServiceActionRequest(id="containerd", action=machine_pb2.STOP)
            await client.machine.ServiceAction(request, timeout=60)
        finally:
            await client.close()

    if CONTAINERD:
        run(stop())
    result = ctl(cluster, "containers", "ps")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert "containerd is not running on this node" in result.stderr
