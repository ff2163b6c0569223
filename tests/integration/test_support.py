"""``basaltctl support`` against a real 1+1 process cluster (real machined, real mTLS).

The bundle is collected as os:admin and as os:reader; every member of the zip is read
back and searched for every secret of the cluster's secrets bundle, in every form one
could leak in (the value, its base64, each PEM line, the PEM body in one line, the raw
and hex bytes of a base64 secret, a token's secret half).
"""

from __future__ import annotations

import base64
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from basalt.cli.main import main
from basalt.machinery.api import machine_pb2
from basalt.machinery.client.config import ClientConfig, issue_client_context, save_client_config
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster

pytestmark = pytest.mark.integration

#: Loopback addresses of this module's cluster (nobody else's).
BASE = "127.0.5.21"
#: A loopback address where nothing listens.
NOBODY = "127.0.5.99"

PER_NODE = (
    "version.yaml",
    "services.yaml",
    "logs/machined.log",
    "dmesg.log",
    "events.txt",
    "upgrade-history.txt",
    "boot-status.yaml",
    "processes.yaml",
    "memory.yaml",
    "mounts.yaml",
    "netstat.yaml",
    "resources/Versions.yaml",
    "resources/Services.yaml",
    "resources/MachineStatuses.yaml",
    "resources/ResourceDefinitions.yaml",
)
CONTROLPLANE_ONLY = ("etcd-status.yaml", "etcd-members.yaml")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    live = start_cluster(tmp_path_factory.mktemp("support"), "support", BASE)
    try:
        yield live
    finally:
        stop_cluster(live)


def _client_config(cluster: LiveCluster, path: Path, role: Role | None) -> Path:
    context = cluster.context
    if role is not None:
        context = issue_client_context(
            cluster.os_ca, endpoints=cluster.context.endpoints, roles=[role]
        )
    save_client_config(ClientConfig(context="support", contexts={"support": context}), path)
    return path


def _support(config: Path, *args: str) -> int:
    return main(["--basaltconfig", str(config), "support", *args])


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


def _secret_strings(secrets: dict[str, Any]) -> list[str]:
    """Every secret value of the bundle: the cluster secret, every token, every key."""
    found = [secrets["cluster"]["secret"], *secrets["tokens"].values()]
    found += [pair["key"] for pair in secrets["certs"].values() if pair.get("key")]
    assert len(found) >= 9, found  # secret, 3 tokens, 5 keys
    return found


def _forms(value: str) -> set[bytes]:
    """The ways ``value`` could show up in a file."""
    forms = {value.encode(), base64.b64encode(value.encode())}
    lines = [line.strip() for line in value.splitlines() if line.strip()]
    body = [line for line in lines if not line.startswith("-----")]
    if len(lines) > 1:
        forms.add("".join(body).encode())  # the PEM body on one line
        forms.update(line.encode() for line in body if len(line) >= 16)
        der = base64.b64decode("".join(body))
        forms.update({der, der.hex().encode()})
    elif "." in value:  # a token: id.secret; the secret half alone is secret
        forms.add(value.split(".", 1)[1].encode())
    else:
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            raw = b""
        if len(raw) >= 16:
            forms.update({raw, raw.hex().encode()})
    return forms


def _assert_no_secrets(members: dict[str, bytes], secrets: dict[str, Any]) -> None:
    forms = {form for value in _secret_strings(secrets) for form in _forms(value)}
    for name, data in members.items():
        for form in forms:
            assert form not in data, f"a secret ({form[:12]!r}...) is in {name}"


def _manifest(members: dict[str, bytes]) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads(members["manifest.json"])
    return manifest


def _check_nodes(members: dict[str, bytes], cluster: LiveCluster) -> None:
    for node in (*cluster.controlplanes, *cluster.workers):
        for item in PER_NODE:
            assert f"nodes/{node}/{item}" in members, (node, item, sorted(members))
        services = yaml.safe_load(members[f"nodes/{node}/services.yaml"])["services"]
        assert services, node
        for service in services:
            assert f"nodes/{node}/logs/{service['id']}.log" in members
        version = yaml.safe_load(members[f"nodes/{node}/version.yaml"])
        assert version["hostname"] and version["tag"]
        assert members[f"nodes/{node}/logs/machined.log"].strip(), node
        assert members[f"nodes/{node}/events.txt"].strip(), node
    for node in cluster.controlplanes:
        for item in CONTROLPLANE_ONLY:
            assert f"nodes/{node}/{item}" in members, (node, item)
    for node in cluster.workers:
        for item in CONTROLPLANE_ONLY:
            assert f"nodes/{node}/{item}" not in members
    summary = yaml.safe_load(members["cluster/summary.yaml"])
    assert {row["node"] for row in summary["nodes"]} == {
        *cluster.controlplanes,
        *cluster.workers,
    }
    assert summary["versions"]
    seen = summary["etcd"]["membersAsSeenBy"]
    assert set(seen) == set(cluster.controlplanes)
    assert summary["etcd"]["membersAgree"] is True
    assert all(len(members) == 1 for members in seen.values())
    readme = members["README.txt"].decode()
    for name in members:
        if name not in ("README.txt", "manifest.json"):
            assert name in readme, name


def _stage_config(cluster: LiveCluster, node: str) -> None:
    """Stage the worker's config on ``node`` (for the next boot: nothing changes now)."""

    async def stage() -> None:
        client = await cluster.client(nodes=[node])
        try:
            request = machine_pb2.ApplyConfigurationRequest(
                data=cluster.config_text("worker").encode(), mode=machine_pb2.STAGED
            )
            answer = await client.machine.ApplyConfiguration(
                request, metadata=client.metadata(), timeout=30
            )
            assert not answer.messages[0].metadata.error, answer
        finally:
            await client.close()

    run(stage())


def test_admin_bundle(cluster: LiveCluster, tmp_path: Path) -> None:
    config = _client_config(cluster, tmp_path / "basaltconfig", None)
    worker = cluster.workers[0]
    _stage_config(cluster, worker)
    out = tmp_path / "support.zip"
    nodes = ",".join((*cluster.controlplanes, *cluster.workers))
    assert _support(config, "-n", nodes, "-o", str(out), "--log-lines", "500") == 0
    assert out.stat().st_mode & 0o777 == 0o600
    members = _members(out)
    _check_nodes(members, cluster)
    for node in (*cluster.controlplanes, *cluster.workers):
        config_text = members[f"nodes/{node}/machineconfig.yaml"].decode()
        assert "(secret)" in config_text
        documents = list(yaml.safe_load_all(config_text))
        assert any(d.get("kind") == "MachineConfig" for d in documents)
        assert f"nodes/{node}/resources/MachineConfigs.yaml" not in members
    staged = members[f"nodes/{worker}/machineconfig-staged.yaml"].decode()
    assert "(secret)" in staged and "MachineConfig" in staged
    _assert_no_secrets(members, cluster.secrets)

    # The file exists: refused without --force, untouched; replaced with it.
    before = out.read_bytes()
    assert _support(config, "-n", nodes, "-o", str(out)) == 1
    assert out.read_bytes() == before
    assert _support(config, "-n", cluster.workers[0], "-o", str(out), "--force") == 0
    assert out.read_bytes() != before
    nodes_now = {name.split("/")[1] for name in _members(out) if name.startswith("nodes/")}
    assert nodes_now == {cluster.workers[0]}


def test_reader_bundle(cluster: LiveCluster, tmp_path: Path) -> None:
    config = _client_config(cluster, tmp_path / "basaltconfig", Role.READER)
    out = tmp_path / "reader.zip"
    nodes = ",".join((*cluster.controlplanes, *cluster.workers))
    assert _support(config, "-n", nodes, "-o", str(out), "--log-lines", "500") == 0
    members = _members(out)
    _check_nodes(members, cluster)
    assert not [name for name in members if "machineconfig" in name.lower()]
    skipped = {(f["where"], f["item"]) for f in _manifest(members)["failures"]}
    for node in (*cluster.controlplanes, *cluster.workers):
        assert (node, "machine config") in skipped
    _assert_no_secrets(members, cluster.secrets)


def test_a_failing_node_is_recorded_and_the_rest_collected(
    cluster: LiveCluster, tmp_path: Path
) -> None:
    config = _client_config(cluster, tmp_path / "basaltconfig", None)
    out = tmp_path / "partial.zip"
    nodes = f"{cluster.controlplanes[0]},{NOBODY}"
    assert _support(config, "-n", nodes, "-o", str(out)) == 0
    members = _members(out)
    assert f"nodes/{cluster.controlplanes[0]}/version.yaml" in members
    assert not [name for name in members if name.startswith(f"nodes/{NOBODY}/")]
    failures = _manifest(members)["failures"]
    assert any(f["where"] == NOBODY and f["item"] == "version" for f in failures), failures
    assert NOBODY in members["README.txt"].decode()


def test_nothing_collected_fails_and_writes_nothing(
    cluster: LiveCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _client_config(cluster, tmp_path / "basaltconfig", None)
    out = tmp_path / "none.zip"
    assert _support(config, "-e", NOBODY, "-n", NOBODY, "-o", str(out), "--timeout", "5") == 1
    assert not out.exists()
    assert not list(tmp_path.glob(".none.zip.*"))
    assert "nothing could be collected" in capsys.readouterr().err


def test_the_secret_search_finds_each_form_of_a_leak() -> None:
    """The search above is only worth something if it fails on a leak: each form of
    each secret, planted in a file, is found."""
    from tests.fakes import inputs

    secrets = inputs.session_secrets().model_dump(mode="json", by_alias=True)
    for value in _secret_strings(secrets):
        for form in _forms(value):
            with pytest.raises(AssertionError, match="a secret"):
                _assert_no_secrets({"nodes/x/logs/x.log": b"line " + form + b" end"}, secrets)
    with pytest.raises(AssertionError, match="a secret"):
        _assert_no_secrets({"machineconfig.yaml": inputs.controlplane_yaml().encode()}, secrets)
