"""The runtime lane on a process node: a real containerd (Debian's, with runc) supervised
by a real machined, driven through the mTLS API: import an image tar built here (no
registry), run it to completion, read its output through the Logs RPC."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.client.client import Client, upload
from basalt.machinery.client.config import issue_client_context
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster
from tests.fakes.oci import SPIN, docker_archive_tar, oci_layout_tar

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="containers need root (runc)"),
    pytest.mark.skipif(
        not (shutil.which("containerd") and shutil.which("runc")),
        reason="needs Debian's containerd and runc (make system-deps)",
    ),
]

BASE_ADDRESS = "127.0.0.231"
PROGRAMS = {
    "/hello": (b"hello from basalt\n", 0),
    "/fail": (b"failing on purpose\n", 3),
    "/spin": (b"spinning\n", SPIN),
}
IMAGE = "example.org/basalt/hello:1.0"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LiveCluster]:
    # Unix socket paths are short (108 bytes): keep the node dirs near the root.
    tmp = Path(tempfile.mkdtemp(prefix="bctr-", dir="/tmp"))
    saved = os.environ.get("BASALT_CONTAINERD")
    os.environ["BASALT_CONTAINERD"] = "1"
    try:
        live = start_cluster(tmp, "ctr", BASE_ADDRESS, workers=0)
    finally:
        if saved is None:
            os.environ.pop("BASALT_CONTAINERD", None)
        else:
            os.environ["BASALT_CONTAINERD"] = saved
    pid = 0
    try:
        pid = run(_wait_containerd(live))
        yield live
    finally:
        stop_cluster(live)
        if pid and _alive(pid):  # machined stops its services; never leave one behind
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"containerd (pid {pid}) outlived its node")
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"containerd")
    except FileNotFoundError:
        return False


async def _wait_containerd(live: LiveCluster, timeout: float = 30.0) -> int:
    import asyncio

    client = await live.client()
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            answer = await client.machine.ServiceList(common_pb2.Empty(), timeout=10)
            found = {s.id: s for s in answer.messages[0].services}
            service = found.get("containerd")
            if service and service.state == "running" and service.health == "healthy":
                return int(service.pid)
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"containerd not healthy: {service}")
            await asyncio.sleep(0.3)
    finally:
        await client.close()


async def _chunks(data: bytes, name: str = "") -> AsyncIterator[machine_pb2.ImageImportRequest]:
    if name:
        yield machine_pb2.ImageImportRequest(options=machine_pb2.ImageImportOptions(name=name))
    for start in range(0, len(data), 4096):
        yield machine_pb2.ImageImportRequest(data=data[start : start + 4096])


async def _import(client: Client, data: bytes, name: str = "") -> machine_pb2.ImageImport:
    answer = await upload(client.machine.ImageImport, _chunks(data, name), timeout=60)
    return answer.messages[0]


async def _images(client: Client) -> list[str]:
    answer = await client.machine.ImageList(
        common_pb2.Empty(), metadata=client.metadata(), timeout=10
    )
    return [i.name for i in answer.messages[0].images]


async def _log(client: Client, log_id: str) -> bytes:
    request = machine_pb2.LogsRequest(id=log_id, tail_lines=-1)
    stream = client.machine.Logs(request, metadata=client.metadata(), timeout=10)
    return b"".join([chunk.bytes async for chunk in stream])


def test_import_and_run_to_completion(cluster: LiveCluster) -> None:
    async def check() -> None:
        client = await cluster.client()
        try:
            imported = await _import(client, oci_layout_tar(IMAGE, PROGRAMS, ["/hello"]))
            assert imported.name == IMAGE
            assert imported.digest.startswith("sha256:")
            assert IMAGE in await _images(client)

            answer = await client.machine.ContainerRun(
                machine_pb2.ContainerRunRequest(image=IMAGE, timeout_seconds=30), timeout=90
            )
            ran = answer.messages[0]
            assert (ran.exit_code, ran.timed_out) == (0, False)
            assert ran.log_id == f"containers/{ran.id}"
            assert await _log(client, ran.log_id) == b"hello from basalt\n"

            # args replace the image's cmd; a non-zero exit is an answer, not an error
            answer = await client.machine.ContainerRun(
                machine_pb2.ContainerRunRequest(image=IMAGE, args=["/fail"]), timeout=90
            )
            failed = answer.messages[0]
            assert failed.exit_code == 3
            assert await _log(client, failed.log_id) == b"failing on purpose\n"

            # past its timeout a run is killed; what it wrote is kept
            answer = await client.machine.ContainerRun(
                machine_pb2.ContainerRunRequest(image=IMAGE, args=["/spin"], timeout_seconds=2),
                timeout=90,
            )
            spun = answer.messages[0]
            assert (spun.timed_out, spun.exit_code) == (True, 128 + 9)
            assert await _log(client, spun.log_id) == b"spinning\n[basalt: killed after 2s]\n"
        finally:
            await client.close()

    run(check())


def test_docker_archive_and_forwarded_run(cluster: LiveCluster) -> None:
    """A docker-archive imports too; ContainerRun and ImageList forward like other RPCs."""
    name = "example.org/basalt/docker-hello:2"

    async def check() -> None:
        client = await cluster.client()
        node = cluster.controlplanes[0]
        try:
            imported = await _import(client, docker_archive_tar(name, PROGRAMS, ["/fail"]))
            assert imported.name == name
            forwarded = await cluster.client(nodes=[node])
            try:
                assert name in await _images(forwarded)
                answer = await forwarded.machine.ContainerRun(
                    machine_pb2.ContainerRunRequest(image=name, args=["/hello"]),
                    metadata=forwarded.metadata(),
                    timeout=90,
                )
                ran = answer.messages[0]
                assert ran.metadata.node == node and not ran.metadata.error
                assert ran.exit_code == 0
                assert await _log(forwarded, ran.log_id) == b"hello from basalt\n"
                # uploads are never forwarded (like Upgrade): the CLI dials the node
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await upload(
                        forwarded.machine.ImageImport,
                        _chunks(docker_archive_tar(name, PROGRAMS, ["/fail"])),
                        metadata=forwarded.metadata(),
                        timeout=30,
                    )
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
                assert "address the node directly" in (caught.value.details() or "")
            finally:
                await forwarded.close()
        finally:
            await client.close()

    run(check())


def _corrupt_layer(data: bytes) -> bytes:
    """The OCI tar with one byte of the gzip layer blob changed (its digest no longer holds)."""
    import io
    import tarfile

    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data)) as source,
        tarfile.open(fileobj=out, mode="w") as target,
    ):
        for member in source.getmembers():
            body = source.extractfile(member)
            content = body.read() if body else b""
            if member.name.startswith("blobs/") and content[:2] == b"\x1f\x8b":
                content = content[:-1] + bytes([content[-1] ^ 0xFF])
            target.addfile(member, io.BytesIO(content))
    return out.getvalue()


def _empty_entries(count: int) -> bytes:
    """A gzip tar of ``count`` empty files: small, but every header costs memory."""
    import gzip
    import io
    import tarfile

    out = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as packed,
        tarfile.open(fileobj=packed, mode="w|", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for i in range(count):
            tar.addfile(tarfile.TarInfo(f"e{i}"))
    return out.getvalue()


BAD_ARCHIVES = ["garbage", "corrupt-layer", "no-name", "too-many-layers", "too-many-entries"]


@pytest.mark.parametrize("kind", BAD_ARCHIVES)
def test_bad_archives_are_refused_and_import_nothing(cluster: LiveCluster, kind: str) -> None:
    name = f"example.org/basalt/bad-{kind}:1"
    data = {
        "garbage": lambda: b"this is not a tar archive\n" * 100,
        "corrupt-layer": lambda: _corrupt_layer(oci_layout_tar(name, PROGRAMS, ["/hello"])),
        "no-name": lambda: oci_layout_tar(name, PROGRAMS, ["/hello"], annotate=False),
        "too-many-layers": lambda: oci_layout_tar(name, PROGRAMS, ["/hello"], repeat=129),
        "too-many-entries": lambda: _empty_entries(20_000),
    }[kind]()
    expected = {
        "garbage": "not a readable tar archive",
        "corrupt-layer": "hashes to",
        "no-name": "give a name",
        "too-many-layers": "lists 129 layers, more than the 128",
        "too-many-entries": "more than 4096 entries",
    }[kind]

    async def check() -> None:
        client = await cluster.client()
        try:
            before = await _images(client)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _import(client, data)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "nothing imported" in (caught.value.details() or "")
            assert expected in (caught.value.details() or "")
            assert await _images(client) == before
        finally:
            await client.close()

    run(check())


def test_reader_cannot_import_or_run(cluster: LiveCluster) -> None:
    async def check() -> None:
        context = issue_client_context(cluster.os_ca, endpoints=[], roles=[Role.READER])
        client = await cluster.client(crt=context.crt, key=context.key)
        try:
            await _images(client)  # readers may list
            archive = oci_layout_tar(IMAGE, PROGRAMS, ["/hello"])
            # every time: the refusal must not race the upload (grpc/grpc#36066 turned it
            # into INTERNAL now and then before uploads waited for the node's go-ahead)
            for _ in range(20):
                with pytest.raises(grpc.aio.AioRpcError) as imported:
                    await _import(client, archive)
                assert imported.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as ran:
                await client.machine.ContainerRun(
                    machine_pb2.ContainerRunRequest(image=IMAGE), timeout=30
                )
            assert ran.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await client.close()

    run(check())


def _ctl(cluster: LiveCluster, *args: str) -> subprocess.CompletedProcess[str]:
    config = Path(cluster.record.state_dir) / "basaltconfig"
    script = Path(sys.executable).with_name("basaltctl")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "basalt.cli.main"]
    return subprocess.run(
        [*argv, *args],
        env={**os.environ, "BASALTCONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_import_images_run(cluster: LiveCluster, tmp_path: Path) -> None:
    name = "example.org/basalt/cli-hello:3"
    archive = tmp_path / "hello.tar"
    archive.write_bytes(oci_layout_tar(name, PROGRAMS, ["/hello"]))
    imported = _ctl(cluster, "containers", "import", str(archive))
    assert imported.returncode == 0, imported.stderr
    assert f"imported {name} (sha256:" in imported.stdout
    listing = _ctl(cluster, "containers", "images")
    assert name in listing.stdout, listing
    ran = _ctl(cluster, "containers", "run", name)
    assert (ran.returncode, ran.stdout) == (0, "hello from basalt\n"), ran.stderr
    failed = _ctl(cluster, "containers", "run", name, "--", "/fail")
    assert (failed.returncode, failed.stdout) == (3, "failing on purpose\n"), failed.stderr
    assert "exited with code 3 (log containers/run-" in failed.stderr
    missing = _ctl(cluster, "containers", "run", "example.org/nothing-here:1")
    assert missing.returncode == 1
    assert "is not on this node: import it first" in missing.stderr
