"""Who may do what: every RPC x every role, bad certificates, forged roles, maintenance mode.

Real machined processes, real mTLS: a control plane and a worker from the process
provisioner; requests go to the control plane directly and through it to the worker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import message_factory

from basalt.machinery.api import common_pb2, machine_pb2, resource_pb2
from basalt.machinery.client.client import Client
from basalt.machinery.client.config import issue_client_context
from basalt.machinery.pki import generate_ca
from basalt.machinery.roles import CLIENT_ROLES, Role, allowed_roles
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster
from tests.fakes.pki import client_certificate

pytestmark = pytest.mark.integration

#: RPCs whose allowed calls change the node; the matrix checks only refusals for them,
#: the lifecycle tests exercise them for real.
DESTRUCTIVE = {"Reboot", "Shutdown", "Reset"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    live = start_cluster(tmp_path_factory.mktemp("security"), "sec", "127.0.0.101")
    yield live
    stop_cluster(live)


def _methods() -> list[tuple[str, Any]]:
    found = []
    for file in (machine_pb2, resource_pb2):
        for service in file.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found.append((f"/{service.full_name}/{method.name}", method))
    return found


METHODS = _methods()


def _request(method: Any, cluster: LiveCluster) -> bytes:
    """A request that is harmless when allowed."""
    cls = message_factory.GetMessageClass(method.input_type)
    fields: dict[str, Any] = {
        "ApplyConfiguration": {
            "data": cluster.config_text("controlplane").encode(),
            "dry_run": True,
        },
        "ServiceAction": {"id": "no-such-service"},
        "GenerateClientConfiguration": {"roles": ["os:reader"]},
        "Logs": {"id": "machined", "tail_lines": 1},
        "Read": {"path": "/var"},
        "Copy": {"root_path": "/var/log"},
        "List": {"root": "/var"}
        if method.containing_service.name == "MachineService"
        else {"type": "Versions"},
        "Get": {"type": "Versions", "id": "version"},
        "Watch": {"type": "Versions", "tail": True},
        "PacketCapture": {"interface": "lo", "duration_seconds": 0.2, "max_packets": 1},
        "DiskUsage": {"paths": ["/var"], "recursion_depth": 0},
        "Cgroups": {"preset": "pids"},
        "MetaRead": {"key": ""},
        "MetaWrite": {"key": "rbac-matrix", "value": "x"},
        "MetaDelete": {"key": "rbac-matrix"},
        "WipeDisk": {"device": "/dev/basalt-no-such-disk"},
    }.get(method.name, {})
    if method.name == "ApplyConfiguration" and cluster.workers:
        fields["data"] = cluster.config_text("controlplane").encode()
    return bytes(cls(**fields).SerializeToString())


async def _call(
    client: Client, path: str, method: Any, request: bytes, nodes: list[str]
) -> grpc.StatusCode:
    metadata = client.metadata(nodes)
    try:
        if method.server_streaming:
            call = client.channel.unary_stream(path)(request, metadata=metadata, timeout=5)
            async for _ in call:
                break
            call.cancel()
        else:
            answer = await client.channel.unary_unary(path)(request, metadata=metadata, timeout=5)
            del answer
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _role_client(cluster: LiveCluster, role: Role) -> Client:
    context = issue_client_context(cluster.os_ca, endpoints=[], roles=[role])
    return await cluster.client(crt=context.crt, key=context.key)


@pytest.mark.parametrize("forwarded", [False, True], ids=["direct", "forwarded"])
def test_rbac_matrix(cluster: LiveCluster, forwarded: bool) -> None:
    nodes = cluster.workers if forwarded else []

    async def check() -> list[str]:
        wrong = []
        for role in CLIENT_ROLES:
            client = await _role_client(cluster, role)
            try:
                for path, method in METHODS:
                    allowed = role in allowed_roles(path)
                    if allowed and method.name in DESTRUCTIVE:
                        continue
                    code = await _call(client, path, method, _request(method, cluster), nodes)
                    if forwarded and code == grpc.StatusCode.OK and not method.server_streaming:
                        # Per-node errors arrive inside the answer; look at the worker's.
                        code = await _forwarded_code(client, path, method, cluster, nodes)
                    denied = code == grpc.StatusCode.PERMISSION_DENIED
                    if allowed == denied:
                        wrong.append(f"{role} {method.name}: {code.name}")
            finally:
                await client.close()
        return wrong

    assert run(check()) == []


async def _forwarded_code(
    client: Client, path: str, method: Any, cluster: LiveCluster, nodes: list[str]
) -> grpc.StatusCode:
    cls = message_factory.GetMessageClass(method.output_type)
    raw = await client.channel.unary_unary(path)(
        _request(method, cluster), metadata=client.metadata(nodes), timeout=5
    )
    answer = cls.FromString(raw)
    codes = [m.metadata.code for m in answer.messages]
    assert [m.metadata.node for m in answer.messages] == nodes
    return (
        grpc.StatusCode.OK
        if not any(codes)
        else next(c for c in grpc.StatusCode if c.value[0] == codes[0])
    )


@pytest.mark.parametrize("kind", ["no-cert", "other-ca", "expired", "not-yet-valid"])
def test_bad_client_certificates_are_refused(cluster: LiveCluster, kind: str) -> None:
    now = dt.datetime.now(dt.UTC)
    endpoint = cluster.controlplanes[0]

    async def check() -> list[str]:
        if kind == "no-cert":
            credentials = grpc.ssl_channel_credentials(
                root_certificates=cluster.context.ca.encode()
            )
            client = Client(grpc.aio.secure_channel(f"{endpoint}:50000", credentials), endpoint)
        else:
            if kind == "other-ca":
                other = generate_ca("impostor")
                bad = issue_client_context(other, endpoints=[], roles=[Role.ADMIN])
                crt, key = bad.crt, bad.key
            else:
                window = (
                    (now - dt.timedelta(days=2), now - dt.timedelta(days=1))
                    if kind == "expired"
                    else (now + dt.timedelta(days=1), now + dt.timedelta(days=2))
                )
                pair = client_certificate(
                    cluster.os_ca, ["os:admin"], not_before=window[0], not_after=window[1]
                )
                crt, key = pair.crt, pair.key or ""
            client = await cluster.client(crt=crt, key=key)
        try:
            codes = []
            for path, method in METHODS:
                code = await _call(client, path, method, _request(method, cluster), [])
                if code != grpc.StatusCode.UNAVAILABLE:
                    codes.append(f"{method.name}: {code.name}")
            return codes
        finally:
            await client.close()

    assert run(check()) == []


def test_reader_cannot_forge_roles_in_metadata(cluster: LiveCluster) -> None:
    """Role metadata from a client is ignored, directly and through forwarding: a reader
    that claims os:admin still gets the machine config with its secrets redacted."""
    forged = (("basalt-roles", "os:admin"), ("basalt-node", "x"))
    request = resource_pb2.ResourceGetRequest(type="MachineConfigs", id="v1alpha1")
    os_key = cluster.os_ca.key or ""

    async def direct() -> str:
        client = await _role_client(cluster, Role.READER)
        try:
            answer = await client.resources.Get(request, metadata=forged, timeout=5)
            return answer.messages[0].resource.spec_json
        finally:
            await client.close()

    async def forwarded() -> list[tuple[str, int, str]]:
        client = await _role_client(cluster, Role.READER)
        try:
            answer = await client.resources.Get(
                request, metadata=client.metadata(cluster.workers) + forged, timeout=5
            )
            return [
                (m.metadata.node, m.metadata.code, m.resource.spec_json) for m in answer.messages
            ]
        finally:
            await client.close()

    key_line = os_key.splitlines()[1]
    text = run(direct())
    assert "(secret)" in text and key_line not in text
    [(node, code, text)] = run(forwarded())
    assert (node, code) == (cluster.workers[0], 0)
    assert "(secret)" in text and "BEGIN CERTIFICATE" in text


def test_impersonator_role_cannot_be_minted(cluster: LiveCluster) -> None:
    async def check() -> grpc.StatusCode:
        client = await cluster.client()
        try:
            await client.machine.GenerateClientConfiguration(
                machine_pb2.GenerateClientConfigurationRequest(roles=["os:impersonator"]),
                timeout=5,
            )
        except grpc.aio.AioRpcError as exc:
            assert "unknown or missing roles: os:impersonator" in (exc.details() or "")
            return exc.code()
        finally:
            await client.close()
        return grpc.StatusCode.OK

    assert run(check()) == grpc.StatusCode.INVALID_ARGUMENT


def test_worker_endpoint_does_not_forward(cluster: LiveCluster) -> None:
    async def check() -> grpc.aio.AioRpcError:
        client = await cluster.client(cluster.workers[0], nodes=cluster.controlplanes)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.machine.ServiceList(
                    common_pb2.Empty(), metadata=client.metadata(), timeout=5
                )
            return raised.value
        finally:
            await client.close()

    error = run(check())
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "use a control plane as the endpoint" in (error.details() or "")


def test_sensitive_files_need_admin(cluster: LiveCluster) -> None:
    async def listing(role: Role) -> tuple[list[str], grpc.StatusCode]:
        client = await _role_client(cluster, role)
        try:
            names = [
                i.name
                async for i in client.machine.List(
                    machine_pb2.ListRequest(root="/", recurse=True, max_depth=2), timeout=5
                )
            ]
            try:
                async for _ in client.machine.List(
                    machine_pb2.ListRequest(root="/system/state"), timeout=5
                ):
                    pass
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            return names, code
        finally:
            await client.close()

    reader_names, reader_code = run(listing(Role.READER))
    admin_names, admin_code = run(listing(Role.ADMIN))
    assert reader_code == grpc.StatusCode.PERMISSION_DENIED
    assert admin_code == grpc.StatusCode.OK
    assert "/system/state" in admin_names
    assert not any(n.startswith("/system/state/") for n in reader_names)


def test_maintenance_mode_serves_only_what_it_must(tmp_path: Path) -> None:
    """A fresh node: version, disks and apply-config only; no forwarding; no resources."""
    import subprocess
    import sys

    node_dir = tmp_path / "fresh"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "basalt.machined",
            "--node-dir",
            str(node_dir),
            "--address",
            "127.0.0.109",
            "--hostname",
            "fresh",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def check() -> dict[str, grpc.StatusCode]:
        for _ in range(100):
            try:
                client = await Client.connect("127.0.0.109", insecure=True)
                break
            except Exception:
                await asyncio.sleep(0.1)
        results = {}
        try:
            for path, method in METHODS:
                results[method.name + ("@res" if "Resource" in path else "")] = await _call(
                    client,
                    path,
                    method,
                    bytes(
                        message_factory.GetMessageClass(method.input_type)(
                            **({"dry_run": True} if method.name == "ApplyConfiguration" else {})
                        ).SerializeToString()
                    ),
                    [],
                )
            results["forwarded"] = await _call(
                client,
                "/basalt.api.v1alpha1.MachineService/Version",
                next(m for p, m in METHODS if m.name == "Version"),
                b"",
                ["127.0.0.1"],
            )
        finally:
            await client.close()
        return results

    try:
        results = run(check())
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert results.pop("Version") == grpc.StatusCode.OK
    assert results.pop("Disks") == grpc.StatusCode.OK
    # An empty config is refused on its merits, not for lack of rights.
    assert results.pop("ApplyConfiguration") == grpc.StatusCode.INVALID_ARGUMENT
    assert results.pop("forwarded") == grpc.StatusCode.FAILED_PRECONDITION
    assert set(results.values()) == {grpc.StatusCode.PERMISSION_DENIED}, results


def test_large_requests_are_refused_by_method_and_denied_ones_are_never_read(
    cluster: LiveCluster,
) -> None:
    """Every method took 32 MiB messages and read them before the role check (16 denied
    30 MiB calls: +1.2 GB). Now: messages over 4 MiB are refused by the transport, over the
    method's own limit before decoding, and a caller without the role is refused first."""
    import psutil

    node = cluster.controlplanes[0]
    pid = int((cluster.node_dir(node) / "machined.pid").read_text())

    async def calls() -> tuple[list[grpc.StatusCode], list[str]]:
        reader = await _role_client(cluster, Role.READER)
        admin = await cluster.client()
        codes: list[grpc.StatusCode] = []
        details: list[str] = []
        try:
            big = machine_pb2.ApplyConfigurationRequest(data=b"x" * (3 * 1024 * 1024))
            for _ in range(16):  # denied: never read
                try:
                    await reader.machine.ApplyConfiguration(big, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
            huge = machine_pb2.ApplyConfigurationRequest(data=b"x" * (30 * 1024 * 1024))
            over = machine_pb2.ApplyConfigurationRequest(data=b"x" * (3 * 1024 * 1024))
            padded = resource_pb2.ResourceGetRequest(type="Members", id="x" * (100 * 1024))
            for call, request in (
                (admin.machine.ApplyConfiguration, huge),
                (admin.machine.ApplyConfiguration, over),
                (admin.resources.Get, padded),
            ):
                try:
                    await call(request, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
                    details.append(exc.details() or "")
        finally:
            await reader.close()
            await admin.close()
        return codes, details

    before = psutil.Process(pid).memory_info().rss
    codes, details = run(calls())
    grown = psutil.Process(pid).memory_info().rss - before
    assert codes[:16] == [grpc.StatusCode.PERMISSION_DENIED] * 16
    assert codes[16:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert "ApplyConfiguration: a request message of 3145" in details[1]
    assert "limit of 2097152 bytes" in details[1]
    assert "Get: a request message of" in details[2] and "limit of 65536" in details[2]
    print(
        f"\nmachined RSS after 16 denied 3 MiB calls and 3 oversized ones: +{grown / 2**20:.1f} MiB"
    )
    assert grown < 64 * 1024 * 1024


def test_concurrent_first_configs_are_applied_once_by_the_maintenance_server(
    cluster: LiveCluster, tmp_path: Path
) -> None:
    """The maintenance server decides by what it is, not by the node's state: of several
    first configs sent at once (no client certificate), one is applied, the others are
    refused; none reaches the authenticated apply path once the node has a config."""
    import subprocess
    import sys

    node_dir = tmp_path / "first"
    address = "127.0.0.108"
    argv = ["--node-dir", str(node_dir), "--address", address, "--hostname", "first"]
    process = subprocess.Popen(
        [sys.executable, "-m", "basalt.machined", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = cluster.config_text("worker").encode()

    async def apply_many() -> list[str]:
        for _ in range(100):
            try:
                client = await Client.connect(address, insecure=True)
                await client.machine.Version(common_pb2.Empty(), timeout=2)
                break
            except Exception:
                await asyncio.sleep(0.1)

        async def one() -> str:
            try:
                await client.machine.ApplyConfiguration(
                    machine_pb2.ApplyConfigurationRequest(data=config), timeout=30
                )
                return "applied"
            except grpc.aio.AioRpcError as exc:
                return exc.details() or exc.code().name

        try:
            return list(await asyncio.gather(*(one() for _ in range(6))))
        finally:
            await client.close()

    try:
        outcomes = run(apply_many())
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert outcomes.count("applied") == 1, outcomes
    # The others are refused, or cut off when the maintenance server closes behind the
    # first; none of them is applied.
    others = [o for o in outcomes if o != "applied"]
    assert all("applied already" in o or o == "CANCELLED" for o in others), outcomes
