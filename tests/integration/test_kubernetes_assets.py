"""Kubernetes assets on real node processes: files, the resource, kubeconfig, access rules.

One control plane and one worker from the process provisioner. The nodes render their
Kubernetes files into their directories; ``basaltctl kubeconfig`` (the installed CLI, in
a subprocess) fetches the admin kubeconfig from the control plane; the files API keeps
``/system/secrets`` to admins; kubelet is skipped because no kubelet binary is in the image.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import kubernetes
import pytest
import yaml

from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.client.config import ClientConfig, issue_client_context, save_client_config
from basalt.machinery.kubernetes import paths
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster

pytestmark = pytest.mark.integration

BASE_ADDRESS = "127.0.0.181"
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]
ADMIN_CONF = paths.ADMIN_KUBECONFIG
WORKER_FILES = {paths.KUBELET_CONFIG, paths.BOOTSTRAP_KUBECONFIG, paths.CA_CRT}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    live = start_cluster(tmp_path_factory.mktemp("k8s-assets"), "k8sassets", BASE_ADDRESS)
    try:
        for address in (*live.controlplanes, *live.workers):
            run(wait_for_assets(live, address))
        yield live
    finally:
        stop_cluster(live)


@pytest.fixture(scope="module")
def configs(cluster: LiveCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A basaltconfig per role: os:admin and os:reader."""
    root = tmp_path_factory.mktemp("basaltconfigs")
    found = {}
    for role in (Role.ADMIN, Role.READER):
        context = issue_client_context(cluster.os_ca, endpoints=cluster.controlplanes, roles=[role])
        path = root / role.value.replace(":", "-")
        save_client_config(ClientConfig(context="k8s", contexts={"k8s": context}), path)
        found[role.value] = path
    return found


async def wait_for_assets(cluster: LiveCluster, address: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await cluster.resource(address, "KubernetesAssets", "assets")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


def ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BASALTCTL, *args],
        env={**os.environ, "BASALTCONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def on_node(cluster: LiveCluster, address: str, path: str) -> Path:
    return cluster.node_dir(address) / path.lstrip("/")


def rendered(cluster: LiveCluster, address: str) -> set[str]:
    root = cluster.node_dir(address)
    found = set()
    for directory in ("system/secrets/kubernetes", "etc/kubernetes"):
        for file in (root / directory).rglob("*"):
            if file.is_file() and file.name != ".rendered.json":
                found.add("/" + str(file.relative_to(root)))
    return found


# -- files and the resource ---------------------------------------------------------------------


def test_files_appear_under_the_node_directories(cluster: LiveCluster) -> None:
    (cp,) = cluster.controlplanes
    (worker,) = cluster.workers
    assert rendered(cluster, worker) == WORKER_FILES
    on_cp = rendered(cluster, cp)
    assert WORKER_FILES.issubset(on_cp)
    assert {ADMIN_CONF, paths.APISERVER_CRT, paths.CA_KEY, paths.SA_KEY} < on_cp
    assert {paths.manifest_path(c) for c in ("kube-apiserver", "kube-scheduler")} < on_cp
    for path in on_cp:
        mode = stat.S_IMODE(on_node(cluster, cp, path).stat().st_mode)
        assert mode == (0o600 if path.startswith("/system/secrets/") else 0o644), path
    secrets_dir = on_node(cluster, cp, paths.SECRETS_DIR)
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    # Container mode: kubelet on the host reads the files under the node's directory.
    kubelet = yaml.safe_load(on_node(cluster, cp, paths.KUBELET_CONFIG).read_text())
    assert kubelet["staticPodPath"] == str(on_node(cluster, cp, paths.MANIFESTS_DIR))
    apiserver = yaml.safe_load(
        on_node(cluster, cp, paths.manifest_path("kube-apiserver")).read_text()
    )
    command = apiserver["spec"]["containers"][0]["command"]
    assert f"--etcd-servers=https://{cp}:2379" in command
    assert f"--advertise-address={cp}" in command


@pytest.mark.parametrize("role", ["controlplane", "worker"])
def test_the_resource_lists_what_was_rendered(cluster: LiveCluster, role: str) -> None:
    address = cluster.controlplanes[0] if role == "controlplane" else cluster.workers[0]
    spec = run(cluster.resource(address, "KubernetesAssets", "assets"))
    assert spec["machineType"] == role
    assert spec["kubernetesVersion"].startswith("v1.")
    listed = {f["path"]: f for f in spec["files"]}
    assert set(listed) == rendered(cluster, address)
    for path, entry in listed.items():
        secret = path.startswith("/system/secrets/")
        assert entry["secret"] is secret
        assert entry["mode"] == ("0600" if secret else "0644")
        if secret:
            assert entry["sha256"] == ""  # digests of secrets are not published
        else:
            data = on_node(cluster, address, path).read_bytes()
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()


# -- basaltctl kubeconfig ---------------------------------------------------------------------


def test_kubeconfig_for_an_admin(
    cluster: LiveCluster, configs: dict[str, Path], tmp_path: Path
) -> None:
    (cp,) = cluster.controlplanes
    target = tmp_path / "kubeconfig"
    result = ctl(configs["os:admin"], "kubeconfig", str(target), "-n", cp)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == on_node(cluster, cp, ADMIN_CONF).read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(target), client_configuration=configuration)
    assert configuration.host == cluster.record.endpoint
    # --no-merge does not overwrite without --force
    again = ctl(configs["os:admin"], "kubeconfig", str(target), "--no-merge", "-n", cp)
    assert again.returncode == 1 and "already exists" in again.stderr
    forced = ctl(configs["os:admin"], "kubeconfig", str(target), "--no-merge", "--force")
    assert forced.returncode == 0, forced.stderr


def test_kubeconfig_merges_into_an_existing_file(
    cluster: LiveCluster, configs: dict[str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "config"
    existing = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "prod", "cluster": {"server": "https://prod.example:6443"}}],
        "users": [{"name": "me", "user": {"token": "abc"}}],
        "contexts": [{"name": "prod", "context": {"cluster": "prod", "user": "me"}}],
        "current-context": "prod",
    }
    target.write_text(yaml.safe_dump(existing))
    result = ctl(configs["os:admin"], "kubeconfig", str(target))
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(target.read_text())
    assert [c["name"] for c in merged["clusters"]] == ["prod", "k8sassets"]
    assert [u["name"] for u in merged["users"]] == ["me", "admin"]
    assert [c["name"] for c in merged["contexts"]] == ["prod", "admin@k8sassets"]
    assert merged["current-context"] == "admin@k8sassets"
    # Fetched again: identical entries are not added twice.
    assert ctl(configs["os:admin"], "kubeconfig", str(target)).returncode == 0
    assert yaml.safe_load(target.read_text()) == merged


def test_kubeconfig_is_denied_to_a_reader(
    cluster: LiveCluster, configs: dict[str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "kubeconfig"
    result = ctl(configs["os:reader"], "kubeconfig", str(target), "-n", cluster.controlplanes[0])
    assert result.returncode == 1
    assert "PERMISSION_DENIED" in result.stderr
    assert not target.exists()


def test_kubeconfig_from_a_worker_says_to_ask_a_control_plane(
    cluster: LiveCluster, configs: dict[str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "kubeconfig"
    result = ctl(configs["os:admin"], "kubeconfig", str(target), "-n", cluster.workers[0])
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "control plane" in result.stderr
    assert not target.exists()


# -- kubelet and file access ------------------------------------------------------------------


def test_kubelet_is_skipped_without_a_binary(cluster: LiveCluster) -> None:
    async def statuses() -> list[machine_pb2.ServiceList]:
        client = await cluster.client()
        try:
            answer = await client.machine.ServiceList(
                common_pb2.Empty(),
                metadata=client.metadata([*cluster.controlplanes, *cluster.workers]),
                timeout=10,
            )
            return list(answer.messages)
        finally:
            await client.close()

    found = run(statuses())
    assert len(found) == 2
    for node in found:
        (kubelet,) = [s for s in node.services if s.id == "kubelet"]
        assert (kubelet.state, kubelet.message) == ("skipped", "kubelet binary not in image")


def test_secrets_are_readable_by_admins_only(
    cluster: LiveCluster, configs: dict[str, Path]
) -> None:
    (cp,) = cluster.controlplanes
    admin = ctl(configs["os:admin"], "read", ADMIN_CONF, "-n", cp)
    assert admin.returncode == 0, admin.stderr
    assert admin.stdout == on_node(cluster, cp, ADMIN_CONF).read_text()
    reader = ctl(configs["os:reader"], "read", ADMIN_CONF, "-n", cp)
    assert reader.returncode == 1 and "PERMISSION_DENIED" in reader.stderr
    listing = ctl(configs["os:reader"], "ls", paths.SECRETS_DIR, "-n", cp)
    assert listing.returncode == 1 and "PERMISSION_DENIED" in listing.stderr
    above = ctl(configs["os:reader"], "ls", "-r", "/system", "-n", cp)
    assert above.returncode == 0, above.stderr
    assert "kubernetes" not in above.stdout and "admin.conf" not in above.stdout
    full = ctl(configs["os:admin"], "ls", "-r", "/system", "-n", cp)
    assert "admin.conf" in full.stdout


def test_certificates_survive_a_reboot(cluster: LiveCluster) -> None:
    (cp,) = cluster.controlplanes
    before = {p: on_node(cluster, cp, p).read_bytes() for p in rendered(cluster, cp)}

    async def reboot() -> None:
        client = await cluster.client(cp)
        try:
            await client.machine.Reboot(machine_pb2.RebootRequest(), timeout=10)
        finally:
            await client.close()
        await asyncio.sleep(0.5)
        await cluster.wait_ready(cp)
        await wait_for_assets(cluster, cp)

    run(reboot())
    after = {p: on_node(cluster, cp, p).read_bytes() for p in rendered(cluster, cp)}
    assert after == before
