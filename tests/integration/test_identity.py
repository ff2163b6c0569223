"""A config generated from another cluster's secrets, applied to a running 1+1 cluster.

Every apply mode (and a dry run, and a patch of the running config) is refused on the
control plane and on the worker with the changed fields named; the node keeps its config,
the admin keeps access through the same endpoint, and no secret value of either cluster
appears in an answer, an event, the node's log or what a reader gets of its config.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml

from basalt.machinery.api import common_pb2, machine_pb2, resource_pb2
from basalt.machinery.client.config import issue_client_context
from basalt.machinery.config import GenerateOptions, generate_configs
from basalt.machinery.config.secrets import SecretsBundle, generate_secrets
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster
from tests.integration.test_lifecycle import apply
from tests.unit.test_redaction import bundle_secrets, leaks

pytestmark = pytest.mark.integration

MODES = ("AUTO", "NO_REBOOT", "REBOOT", "STAGED", "TRY")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    live = start_cluster(tmp_path_factory.mktemp("identity"), "ident", "127.0.0.141")
    yield live
    stop_cluster(live)


@pytest.fixture(scope="module")
def other() -> tuple[SecretsBundle, dict[str, str]]:
    """The same cluster name and endpoint, generated from a new `gen secrets`: the wrong
    directory of someone who runs two clusters."""
    secrets = generate_secrets()
    generated = generate_configs(
        secrets,
        GenerateOptions(
            cluster_name="ident", endpoint="https://127.0.0.141:6443", version_contract="0.1"
        ),
    )
    texts = {"controlplane": generated.controlplane.to_yaml(), "worker": generated.worker.to_yaml()}
    return secrets, texts


def values(cluster: LiveCluster, other: Any) -> list[str]:
    ours = SecretsBundle.model_validate(cluster.secrets)
    return bundle_secrets(ours) + bundle_secrets(other[0])


async def _apply(cluster: LiveCluster, node: str, text: str, mode: str, **extra: Any) -> Any:
    """Apply on ``node`` directly (its own endpoint): a refusal raises."""
    return await apply(cluster, node, text, mode, **extra)


async def _apply_through(cluster: LiveCluster, node: str, text: str) -> Any:
    """Apply on ``node`` through the control plane (-n NODE): a refusal is in the answer."""
    client = await cluster.client(nodes=[node])
    try:
        answer = await client.machine.ApplyConfiguration(
            machine_pb2.ApplyConfigurationRequest(data=text.encode()),
            metadata=client.metadata(),
            timeout=30,
        )
        return answer.messages[0]
    finally:
        await client.close()


def committed(cluster: LiveCluster, node: str) -> str:
    return (cluster.node_dir(node) / "system" / "state" / "config.yaml").read_text()


def test_a_config_from_other_secrets_is_refused_in_every_mode(
    cluster: LiveCluster, other: Any
) -> None:
    secret_values = values(cluster, other)
    for node, kind in ((cluster.controlplanes[0], "controlplane"), (cluster.workers[0], "worker")):
        before = committed(cluster, node)
        for mode in MODES:
            for dry_run in (False, True):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    run(_apply(cluster, node, other[1][kind], mode, dry_run=dry_run))
                assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION, mode
                details = raised.value.details() or ""
                assert "would change the node's identity" in details, details
                for field in ("MachineConfig.ca.crt", "ClusterConfig.id", "ClusterConfig.secret"):
                    assert field in details, (node, mode, field)
                assert "--allow-identity-change" in details
                assert not leaks(details, secret_values)
        through = run(_apply_through(cluster, node, other[1][kind]))
        assert "would change the node's identity" in through.metadata.error
        assert through.metadata.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert committed(cluster, node) == before
        # the other kind's config: a type change is named too
        wrong_type = other[1]["worker" if kind == "controlplane" else "controlplane"]
        with pytest.raises(grpc.aio.AioRpcError, match=r"MachineConfig\.type"):
            run(_apply(cluster, node, wrong_type, "AUTO"))


def test_the_admin_keeps_access_and_nothing_changed(cluster: LiveCluster, other: Any) -> None:
    async def versions() -> list[str]:
        client = await cluster.client(nodes=[*cluster.controlplanes, *cluster.workers])
        try:
            answer = await client.machine.Version(
                common_pb2.Empty(), metadata=client.metadata(), timeout=15
            )
            return [m.metadata.node for m in answer.messages if not m.metadata.error]
        finally:
            await client.close()

    for mode in MODES:
        with pytest.raises(grpc.aio.AioRpcError):
            run(_apply(cluster, cluster.controlplanes[0], other[1]["controlplane"], mode))
    assert sorted(run(versions())) == sorted([*cluster.controlplanes, *cluster.workers])
    staged = run(_resource_ids(cluster, cluster.controlplanes[0], "MachineConfigs"))
    assert staged == ["v1alpha1"]  # nothing staged by the refused STAGED apply


async def _resource_ids(cluster: LiveCluster, node: str, type_: str) -> list[str]:
    client = await cluster.client(node)
    try:
        return [
            item.resource.metadata.id
            async for item in client.resources.List(
                resource_pb2.ResourceListRequest(type=type_), timeout=10
            )
        ]
    finally:
        await client.close()


def test_an_admin_may_replace_the_identity_explicitly_and_is_told_the_cost(
    cluster: LiveCluster, other: Any
) -> None:
    secret_values = values(cluster, other)
    node = cluster.workers[0]
    answer = run(
        _apply(cluster, node, other[1]["worker"], "AUTO", dry_run=True, allow_identity_change=True)
    )
    warnings = " ".join(answer.warnings)
    assert "identity replaced on request" in warnings and "stops working" in warnings
    assert "(secret, changed)" in answer.diff
    assert not leaks(answer.diff + warnings + answer.mode_details, secret_values)


def test_readers_see_the_config_with_secrets_redacted_and_admin_reads_are_events(
    cluster: LiveCluster, other: Any
) -> None:
    secret_values = values(cluster, other)
    node = cluster.controlplanes[0]

    async def read(role: Role) -> dict[str, Any]:
        issued = issue_client_context(cluster.os_ca, endpoints=[], roles=[role])
        client = await cluster.client(node, crt=issued.crt, key=issued.key)
        try:
            answer = await client.resources.Get(
                resource_pb2.ResourceGetRequest(type="MachineConfigs", id="v1alpha1"), timeout=10
            )
            return dict(json.loads(answer.messages[0].resource.spec_json))
        finally:
            await client.close()

    for role in (Role.READER, Role.OPERATOR):
        text = str(run(read(role))["yaml"])
        assert "(secret)" in text and not leaks(text, secret_values)
        kinds = [d["kind"] for d in yaml.safe_load_all(text)]  # still the whole config
        assert kinds[:2] == ["MachineConfig", "ClusterConfig"] and "BEGIN CERTIFICATE" in text
    full = str(run(read(Role.ADMIN))["yaml"])
    assert leaks(full, secret_values)  # the admin asked for them
    events = run(_events(cluster, node))
    assert any("MachineConfigs read with its secrets" in e for e in events)
    assert not leaks("\n".join(events), secret_values)
    logs = "\n".join(p.read_text(errors="replace") for p in cluster.node_dir(node).rglob("*.log"))
    assert not leaks(logs, secret_values)


async def _events(cluster: LiveCluster, node: str) -> list[str]:
    client = await cluster.client(node)
    try:
        return [
            f"{e.message} {dict(e.fields)}"
            async for e in client.machine.Events(machine_pb2.EventsRequest(), timeout=10)
        ]
    finally:
        await client.close()


def test_an_admin_read_of_a_secret_file_is_an_event(cluster: LiveCluster) -> None:
    node = cluster.workers[0]

    async def read(path: str) -> bytes:
        client = await cluster.client(node)
        try:
            return b"".join(
                [
                    chunk.bytes
                    async for chunk in client.machine.Read(
                        machine_pb2.ReadRequest(path=path), timeout=10
                    )
                ]
            )
        finally:
            await client.close()

    assert b"MachineConfig" in run(read("/system/state/config.yaml"))
    events = run(_events(cluster, node))
    assert any("read of /system/state/config.yaml with its secrets" in e for e in events)
    assert any("CN=basaltctl" in e or "basaltctl" in e for e in events if "secrets" in e)
