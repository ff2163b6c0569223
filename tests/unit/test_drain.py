"""Cordon, drain and uncordon through the Kubernetes API, against a fake API server.

No kube-apiserver can be installed on this machine (ARCHITECTURE.md), so the client is
proven here against :mod:`tests.fakes.kube_apiserver`: real HTTPS with certificates
from the test's own CA and a required client certificate, on 127.0.0.200-209.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from basalt.machined.api.upgrade import RollbackJob
from basalt.machined.assemble import build_node
from basalt.machined.kubernetes.client import (
    KubeconfigError,
    KubeCredentials,
    credentials_from,
    load_kubeconfig,
)
from basalt.machined.kubernetes.cordon import kubelet_node_name
from basalt.machined.kubernetes.drain import (
    DrainError,
    DrainResult,
    PodAction,
    PodRef,
    plan,
)
from basalt.machined.kubernetes.intent import (
    INTENT_FILE,
    UncordonIntent,
    read_intent,
    write_intent,
)
from basalt.machined.node import Node, Tuning
from basalt.machined.platform import NodePaths, Platform, PlatformMode
from basalt.machined.sequencer.sequences import rollback
from basalt.machined.services import RestartPolicy, ServiceSpec, TaskRunner
from basalt.machined.upgrade import NO_KUBERNETES, UpgradeJob, UpgradeOptions, UpgradeRefusedError
from basalt.machinery.boot import Boot, GatesPassed, Install, SlotName, apply, initial_state
from basalt.machinery.kubernetes import build_kubeconfig, dump_kubeconfig, paths
from basalt.machinery.pki import CertificateAndKey, generate_ca, issue_certificate
from tests.fakes.kube_apiserver import PDB_MESSAGE, FakeKubeApiServer

HOST = "127.0.0.200"
OTHER_HOST = "127.0.0.201"
NODE = "worker-1"
FAST = Tuning(
    drain_timeout=3.0,
    drain_backoff=0.05,
    drain_poll=0.05,
    uncordon_attempts=3,
    uncordon_backoff=0.05,
    kube_request_timeout=2.0,
)


@pytest.fixture(scope="module")
def ca() -> CertificateAndKey:
    return generate_ca("kubernetes")


@pytest.fixture(scope="module")
def admin(ca: CertificateAndKey) -> CertificateAndKey:
    return issue_certificate(ca, "kubernetes-admin", organizations=["system:masters"], client=True)


@pytest.fixture
def api(ca: CertificateAndKey) -> Iterator[FakeKubeApiServer]:
    with FakeKubeApiServer(ca, host=HOST) as server:
        server.add_node(NODE)
        yield server


def kubeconfig(server: str, ca_crt: str, client: CertificateAndKey) -> str:
    return dump_kubeconfig(
        build_kubeconfig(cluster="test", server=server, ca_crt=ca_crt, user="admin", client=client)
    )


def write_kubeconfig(
    root: Path, server: str, ca_crt: str, client: CertificateAndKey, view: str = ""
) -> Path:
    path = root / (view or paths.ADMIN_KUBECONFIG).lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(kubeconfig(server, ca_crt, client))
    return path


async def _forever(log: Any) -> None:
    await asyncio.Event().wait()


@asynccontextmanager
async def node_at(
    root: Path, *, kubelet: bool = True, tuning: Tuning = FAST
) -> AsyncIterator[Node]:
    """A container-mode node in ``root``, named NODE; its kubelet a task that runs."""
    platform = Platform(PlatformMode.CONTAINER, NodePaths.under(root), "127.0.0.209", NODE)
    node = build_node(platform, replace(tuning))
    node.paths.create()
    if kubelet:
        runner = TaskRunner(_forever, stop_timeout=1.0)
        node.supervisor.register(ServiceSpec("kubelet", runner, restart=RestartPolicy.NEVER))
        await node.supervisor.start("kubelet")
        while str(node.supervisor.status("kubelet").state) != "running":
            await asyncio.sleep(0.01)
    try:
        yield node
    finally:
        await node.stop_background()
        await node.supervisor.stop_all()


def events(node: Node) -> list[str]:
    return [e.message for e in node.events.history() if e.type == "kubernetes"]


def closed_port(host: str) -> int:
    """A port on ``host`` that nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


async def until(check: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- which pods go: plan() ------------------------------------------------------------------


def _pod(
    *, phase: str = "Running", annotations: dict[str, str] | None = None, owners: Any = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "namespace": "ns", "uid": "u1"}
    if annotations is not None:
        meta["annotations"] = annotations
    if owners is not None:
        meta["ownerReferences"] = owners
    return {"metadata": meta, "status": {"phase": phase}}


DS = {"kind": "DaemonSet", "name": "ds", "controller": True}
RS = {"kind": "ReplicaSet", "name": "rs", "controller": True}
MIRROR = {"kubernetes.io/config.mirror": "abc"}


@pytest.mark.parametrize(
    ("pod", "action"),
    [
        (_pod(owners=[RS]), PodAction.EVICT),
        (_pod(), PodAction.EVICT),  # a bare pod: the reboot would stop it anyway
        (_pod(phase="Pending", owners=[RS]), PodAction.EVICT),
        (_pod(annotations=MIRROR), PodAction.SKIP_MIRROR),
        (_pod(annotations=MIRROR, phase="Succeeded"), PodAction.SKIP_MIRROR),
        (_pod(owners=[DS]), PodAction.SKIP_DAEMONSET),
        (_pod(owners=[DS], phase="Failed"), PodAction.SKIP_DAEMONSET),
        (_pod(owners=[{**DS, "controller": False}, RS]), PodAction.EVICT),
        (_pod(phase="Succeeded", owners=[RS]), PodAction.DELETE),
        (_pod(phase="Failed"), PodAction.DELETE),
        (_pod(annotations={"other": "x"}), PodAction.EVICT),
    ],
)
def test_plan_decides_per_pod(pod: dict[str, Any], action: PodAction) -> None:
    assert plan(pod) is action


def _refs(*names: str) -> list[PodRef]:
    return [PodRef("default", n, n) for n in names]


@pytest.mark.parametrize(
    ("result", "text"),
    [
        (DrainResult(), "evicted 0 pods"),
        (DrainResult(_refs("a")), "evicted 1 pod"),
        (
            DrainResult(_refs("a", "b", "c"), skipped=Counter({"DaemonSet": 2})),
            "evicted 3 pods (2 skipped: DaemonSet)",
        ),
        (
            DrainResult(
                _refs("a"),
                _refs("done"),
                Counter({"DaemonSet": 1, "mirror pod": 2}),
                refusals=3,
            ),
            "evicted 1 pod, deleted 1 finished after 3 disruption-budget refusals "
            "(3 skipped: 1 DaemonSet, 2 mirror pod)",
        ),
    ],
)
def test_drain_summary_says_what_happened(result: DrainResult, text: str) -> None:
    assert result.summary() == text


# -- kubeconfigs --------------------------------------------------------------------------------


def test_kubeconfig_with_inline_credentials(
    tmp_path: Path, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    path = write_kubeconfig(tmp_path, "https://10.5.0.1:6443/", ca.crt, admin)
    credentials = load_kubeconfig(path, "admin.conf")
    assert credentials.server == "https://10.5.0.1:6443"
    assert credentials.ca_pem == ca.crt
    assert credentials.client_pem is not None and b"PRIVATE KEY" in credentials.client_pem


def test_kubeconfig_with_files_relative_to_it(
    tmp_path: Path, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    """What the kubelet writes after TLS bootstrap: the CA and its rotating pem as files."""
    assert admin.key is not None
    (tmp_path / "ca.crt").write_text(ca.crt)
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "kubelet-client-current.pem").write_text(admin.crt + admin.key)
    data = {
        "clusters": [
            {
                "name": "c",
                "cluster": {"server": "https://h:6443", "certificate-authority": "ca.crt"},
            }
        ],
        "users": [
            {
                "name": "u",
                "user": {
                    "client-certificate": "pki/kubelet-client-current.pem",
                    "client-key": "pki/kubelet-client-current.pem",
                },
            }
        ],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
    }
    credentials = credentials_from(data, "kubelet.conf", tmp_path)
    assert credentials.ca_pem == ca.crt
    assert credentials.client_pem is not None and credentials.client_pem.count(b"BEGIN") == 2


def _config(cluster: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    return {
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }


CA_DATA = {"server": "https://h:6443", "certificate-authority-data": "Zm9v"}


@pytest.mark.parametrize(
    ("cluster", "user", "problem"),
    [
        ({**CA_DATA, "insecure-skip-tls-verify": True}, {"token": "t"}, "always verifies"),
        ({**CA_DATA, "server": "http://h:8080"}, {"token": "t"}, "not an https:// URL"),
        ({"server": "https://h:6443"}, {"token": "t"}, "no certificate-authority"),
        ({**CA_DATA, "certificate-authority-data": "%%"}, {"token": "t"}, "not base64"),
        (CA_DATA, {}, "neither a client certificate nor a token"),
        (CA_DATA, {"exec": {"command": "x"}}, "exec and auth-provider"),
        (CA_DATA, {"client-certificate-data": "Zm9v"}, "not both"),
        (CA_DATA, {"client-certificate": "missing.pem", "client-key": "k"}, "missing.pem"),
    ],
)
def test_unusable_kubeconfigs_are_refused_naming_why(
    tmp_path: Path, cluster: dict[str, Any], user: dict[str, Any], problem: str
) -> None:
    with pytest.raises(KubeconfigError, match=problem):
        credentials_from(_config(cluster, user), "admin.conf", tmp_path)


def test_a_token_is_a_bearer_credential() -> None:
    credentials = credentials_from(_config(CA_DATA, {"token": " abc \n"}), "x", Path("/"))
    assert credentials == KubeCredentials("https://h:6443", "foo", "x", None, "abc")


def test_the_node_name_is_the_kubelet_s(tmp_path: Path) -> None:
    from tests.fakes import inputs

    async def run() -> None:
        async with node_at(tmp_path, kubelet=False) as node:
            node.platform.hostname = "Worker-1"
            assert kubelet_node_name(node) == "worker-1"  # kubelet lowercases it
            patch = "kind: MachineConfig\nkubelet:\n  extraArgs: {hostname-override: Custom}\n"
            node.use_config(inputs.generate(patch).worker)
            assert kubelet_node_name(node) == "custom"

    asyncio.run(run())


# -- cordon and drain for an upgrade ----------------------------------------------------------


def test_cordon_and_drain_evicts_the_right_pods(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    api.add_pod("web-1", linger=0.3)
    api.add_pod("web-2", namespace="shop")
    api.add_pod("job-done", phase="Succeeded")
    api.add_pod("kube-proxy-x", namespace="kube-system", daemonset=True)
    api.add_pod("etcd-x", namespace="kube-system", mirror=True)
    api.add_pod("elsewhere", node="worker-2")
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)

    async def run() -> list[str]:
        async with node_at(tmp_path) as node:
            steps = await node.upgrader.cordon_drain(no_drain=False)
            assert read_intent(node.paths.state) == UncordonIntent(NODE)
            assert any("cordoned node worker-1" in e for e in events(node))
            return steps

    steps = asyncio.run(run())
    assert steps == [
        "cordoned node worker-1",
        "evicted 2 pods, deleted 1 finished (2 skipped: 1 DaemonSet, 1 mirror pod)",
    ]
    assert api.unschedulable(NODE)
    evicted = sorted(p.split("/")[-2] for p in api.requests("POST", "/eviction"))
    assert evicted == ["web-1", "web-2"]
    assert api.requests("DELETE") == ["/api/v1/namespaces/default/pods/job-done"]
    assert api.requests("GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dworker-1")
    assert {cn for _, _, cn in api.log} == {"kubernetes-admin"}  # mTLS: the client cert
    assert all(p.gone for p in api.pods if p.name in ("web-1", "web-2", "job-done"))
    assert not any(p.gone for p in api.pods if p.name in ("kube-proxy-x", "etcd-x", "elsewhere"))


def test_a_disruption_budget_is_retried_until_it_allows(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    api.add_pod("db-0", pdb_refusals=3)
    api.add_pod("web-1")
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)

    async def run() -> list[str]:
        async with node_at(tmp_path) as node:
            return await node.upgrader.cordon_drain(no_drain=False)

    steps = asyncio.run(run())
    assert steps[-1] == "evicted 2 pods after 3 disruption-budget refusals"
    assert [p.evictions for p in api.pods] == [4, 1]


def test_a_drain_that_cannot_finish_is_refused_and_the_node_uncordoned(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    api.add_pod("db-0", namespace="data", pdb_refusals=-1)
    api.add_pod("slow-1", linger=30.0)
    api.add_pod("web-1")
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)
    tuning = replace(FAST, drain_timeout=1.0)

    async def run() -> DrainError:
        async with node_at(tmp_path, tuning=tuning) as node:
            with pytest.raises(DrainError) as caught:
                await node.upgrader.cordon_drain(no_drain=False)
            assert read_intent(node.paths.state) is None
            assert "uncordoned node worker-1: the upgrade was refused" in events(node)
            return caught.value

    error = asyncio.run(run())
    text = error.render()
    assert "did not finish within 1 s" in text
    assert "data/db-0 (eviction refused" in text and PDB_MESSAGE in text
    assert "default/slow-1 (evicted, still terminating)" in text
    assert "web-1" not in text  # it went
    assert "node worker-1 uncordoned again" in text
    assert "--no-drain" in text
    assert not api.unschedulable(NODE)


def test_an_eviction_error_other_than_429_refuses_at_once(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    api.add_pod("db-0", eviction_status=500)
    api.add_pod("db-1", pdb_refusals=-1)
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)

    async def run() -> DrainError:
        async with node_at(tmp_path, tuning=replace(FAST, drain_timeout=30.0)) as node:
            with pytest.raises(DrainError) as caught:
                await node.upgrader.cordon_drain(no_drain=False)
            return caught.value

    error = asyncio.run(run())
    assert "evicting pod default/db-0" in str(error) and "HTTP 500" in str(error)
    assert not api.unschedulable(NODE)


def test_an_already_cordoned_node_stays_cordoned(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    api.add_node(NODE, unschedulable=True)
    api.add_pod("web-1")
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)

    async def run() -> list[str]:
        async with node_at(tmp_path) as node:
            steps = await node.upgrader.cordon_drain(no_drain=False)
            assert read_intent(node.paths.state) is None
        async with node_at(tmp_path) as node:  # the reboot
            await _boot_good(node)
            await asyncio.sleep(0.3)
        return steps

    steps = asyncio.run(run())
    assert steps == [
        "node worker-1 was already cordoned; it stays cordoned after the upgrade",
        "evicted 1 pod",
    ]
    assert api.unschedulable(NODE)
    assert not api.requests("PATCH")


def test_an_admin_cordoned_node_stays_cordoned_when_the_drain_is_refused(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    api.add_node(NODE, unschedulable=True)
    api.add_pod("db-0", pdb_refusals=-1)
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)

    async def run() -> DrainError:
        async with node_at(tmp_path, tuning=replace(FAST, drain_timeout=0.5)) as node:
            with pytest.raises(DrainError) as caught:
                await node.upgrader.cordon_drain(no_drain=False)
            return caught.value

    assert "node worker-1 stays cordoned, as it was" in str(asyncio.run(run()))
    assert api.unschedulable(NODE)
    assert not api.requests("PATCH")


# -- refusals before anything changes -----------------------------------------------------


def _refused(tmp_path: Path, tuning: Tuning = FAST) -> DrainError:
    async def run() -> DrainError:
        async with node_at(tmp_path, tuning=tuning) as node:
            with pytest.raises(DrainError) as caught:
                await node.upgrader.cordon_drain(no_drain=False)
            assert read_intent(node.paths.state) is None
            return caught.value

    return asyncio.run(run())


def test_an_unreachable_api_server_refuses_naming_it(
    tmp_path: Path, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    url = f"https://{HOST}:{closed_port(HOST)}"
    write_kubeconfig(tmp_path, url, ca.crt, admin)
    error = _refused(tmp_path)
    assert f"cannot reach the Kubernetes API server at {url}" in str(error)
    assert "Connection refused" in str(error)
    assert "the node was not changed" in str(error)
    assert "--no-drain" in error.render()


def test_a_server_certificate_from_another_ca_is_refused(
    tmp_path: Path, admin: CertificateAndKey, ca: CertificateAndKey
) -> None:
    other = generate_ca("another-cluster")
    with FakeKubeApiServer(other, host=OTHER_HOST, client_ca=ca.crt) as server:
        server.add_node(NODE)
        write_kubeconfig(tmp_path, server.url, ca.crt, admin)
        error = _refused(tmp_path)
        assert not server.log  # no request was sent to an untrusted server
    assert f"the Kubernetes API server at {server.url} is not trusted" in str(error)
    assert "certificate verify failed" in str(error) or "unable to get local issuer" in str(error)


def test_a_client_certificate_the_server_does_not_trust_is_refused(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey
) -> None:
    stranger = issue_certificate(generate_ca("elsewhere"), "someone", client=True)
    write_kubeconfig(tmp_path, api.url, ca.crt, stranger)
    error = _refused(tmp_path)
    assert "the Kubernetes API server at" in str(error)
    assert api.handshake_failures >= 1 and not api.log
    assert not api.unschedulable(NODE)


def test_credentials_the_server_forbids_are_refused(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    api.forbidden = True
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)
    error = _refused(tmp_path)
    assert "refused reading node worker-1 (HTTP 403)" in str(error)
    assert paths.ADMIN_KUBECONFIG in str(error)


def test_an_unregistered_node_is_refused(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    del api.nodes[NODE]
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)
    assert "node worker-1 is not registered" in str(_refused(tmp_path))


def test_no_kubeconfig_yet_is_refused(tmp_path: Path) -> None:
    error = _refused(tmp_path)
    assert "no kubeconfig reaches the Kubernetes API" in str(error)
    assert paths.KUBELET_KUBECONFIG in str(error)


def test_a_worker_uses_the_kubelet_s_kubeconfig(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey
) -> None:
    kubelet = issue_certificate(
        ca, f"system:node:{NODE}", organizations=["system:nodes"], client=True
    )
    write_kubeconfig(tmp_path, api.url, ca.crt, kubelet, view=paths.KUBELET_KUBECONFIG)

    async def run() -> list[str]:
        async with node_at(tmp_path) as node:
            return await node.upgrader.cordon_drain(no_drain=False)

    assert asyncio.run(run()) == ["cordoned node worker-1", "evicted 0 pods"]
    assert {cn for _, _, cn in api.log} == {"system:node:worker-1"}


# -- when there is nothing to drain: unchanged --------------------------------------------------


def test_no_kubelet_says_so_and_goes_on(tmp_path: Path, api: FakeKubeApiServer) -> None:
    async def run() -> tuple[str | None, list[str]]:
        async with node_at(tmp_path, kubelet=False) as node:
            return node.upgrader.check_drain(False), await node.upgrader.cordon_drain(False)

    assert asyncio.run(run()) == (NO_KUBERNETES, [NO_KUBERNETES])
    assert not api.log


def test_a_skipped_kubelet_says_so_and_goes_on(tmp_path: Path, api: FakeKubeApiServer) -> None:
    async def run() -> list[str]:
        async with node_at(tmp_path, kubelet=False) as node:
            spec = ServiceSpec(
                "kubelet", TaskRunner(_forever), skip_reason=lambda: "kubelet binary not in image"
            )
            node.supervisor.register(spec)
            await node.supervisor.start("kubelet")
            await until(lambda: str(node.supervisor.status("kubelet").state) == "skipped")
            return await node.upgrader.cordon_drain(no_drain=False)

    assert asyncio.run(run()) == [NO_KUBERNETES]
    assert not api.log


def test_no_drain_skips_the_api(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)

    async def run() -> list[str]:
        async with node_at(tmp_path) as node:
            return await node.upgrader.cordon_drain(no_drain=True)

    assert asyncio.run(run()) == ["cordon/drain skipped (--no-drain)"]
    assert not api.log


# -- after the reboot: the uncordon -----------------------------------------------------------


async def _boot_good(node: Node) -> None:
    """The launcher booted slot a, good; the boot sequence reaches running."""
    slots = node.upgrader.require_slots()
    slots.save(replace(initial_state("0.1.0"), booted=SlotName.A))
    await node.upgrader.on_boot()
    node.set_stage("running")


def _drained(tmp_path: Path) -> None:
    async def run() -> None:
        async with node_at(tmp_path) as node:
            await node.upgrader.cordon_drain(no_drain=False)

    asyncio.run(run())


def test_the_uncordon_survives_the_reboot_and_happens_once(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)
    _drained(tmp_path)
    assert api.unschedulable(NODE)
    assert (tmp_path / "system" / "state" / INTENT_FILE).is_file()

    async def boot() -> list[str]:
        async with node_at(tmp_path) as node:  # a new machined: the reboot
            await _boot_good(node)
            if read_intent(node.paths.state) is not None:
                await until(lambda: any(e.startswith("uncordoned") for e in events(node)))
            await asyncio.sleep(0.2)
            assert read_intent(node.paths.state) is None
            return events(node)

    first = asyncio.run(boot())
    assert "uncordoned node worker-1: the node runs slot a (0.1.0) again" in first
    assert not api.unschedulable(NODE)
    patches = len(api.requests("PATCH"))
    assert patches == 2  # cordon, uncordon
    asyncio.run(boot())  # and the next boot does nothing
    assert len(api.requests("PATCH")) == patches


def test_the_uncordon_waits_for_the_gates_of_a_slot_on_trial(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)
    _drained(tmp_path)

    async def boot() -> None:
        async with node_at(tmp_path) as node:
            state = replace(initial_state("0.1.0"), booted=SlotName.A)
            state = apply(apply(state, Install("0.2.0")).state, Boot()).state
            node.upgrader.require_slots().save(state)
            node.set_stage("running")
            await node.upgrader.on_boot()
            node.upgrader._stop_assessment()  # the test passes the gates itself
            await asyncio.sleep(0.3)
            assert api.unschedulable(NODE)  # on trial: still cordoned
            await node.upgrader.record(GatesPassed())
            done = "uncordoned node worker-1: slot b (0.2.0) passed its gates"
            await until(lambda: done in events(node))
            assert read_intent(node.paths.state) is None
            assert not api.unschedulable(NODE)

    asyncio.run(boot())


def test_the_uncordon_is_retried_until_the_api_server_is_back(
    tmp_path: Path, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    port = closed_port(HOST)
    write_kubeconfig(tmp_path, f"https://{HOST}:{port}", ca.crt, admin)
    write_intent(tmp_path / "system" / "state", UncordonIntent(NODE))
    tuning = replace(FAST, uncordon_attempts=50, uncordon_backoff=0.1)

    async def boot() -> list[str]:
        async with node_at(tmp_path, tuning=tuning) as node:
            await _boot_good(node)
            await until(lambda: any("failed" in e for e in events(node)))
            server = await asyncio.to_thread(FakeKubeApiServer, ca, host=HOST, port=port)
            try:
                server.add_node(NODE, unschedulable=True)
                await until(lambda: any(e.startswith("uncordoned") for e in events(node)), 10)
                assert read_intent(node.paths.state) is None
                assert not server.unschedulable(NODE)
            finally:
                await asyncio.to_thread(server.close)
            return events(node)

    seen = asyncio.run(boot())
    assert seen[0].startswith("uncordoning node worker-1 failed: ")
    assert "cannot reach the Kubernetes API server" in seen[0]
    assert seen[-1] == "uncordoned node worker-1: the node runs slot a (0.1.0) again"


def test_a_failed_uncordon_gives_up_with_an_event_and_never_fails_the_boot(
    tmp_path: Path, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    write_kubeconfig(tmp_path, f"https://{HOST}:{closed_port(HOST)}", ca.crt, admin)
    write_intent(tmp_path / "system" / "state", UncordonIntent(NODE))

    async def boot() -> list[str]:
        async with node_at(tmp_path) as node:
            await _boot_good(node)
            await until(lambda: any(e.startswith("gave up") for e in events(node)))
            assert read_intent(node.paths.state) is None
            assert node.stage == "running"
            return events(node)

    seen = asyncio.run(boot())
    assert seen[-1].startswith("gave up uncordoning node worker-1 after 3 attempts: ")
    assert seen[-1].endswith("uncordon it yourself: kubectl uncordon worker-1")


def test_a_failed_install_after_the_drain_uncordons(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    from basalt.machined.sequencer.sequences import cordon_drain, install_image

    write_kubeconfig(tmp_path, api.url, ca.crt, admin)

    async def run() -> None:
        async with node_at(tmp_path) as node:
            job = UpgradeJob(UpgradeOptions(), tmp_path / "bundle.tar")
            await cordon_drain(node, job)
            assert api.unschedulable(NODE)
            with pytest.raises(UpgradeRefusedError, match="no boot state"):
                await install_image(node, job)  # no slots/boot.json: refused
            assert read_intent(node.paths.state) is None

    asyncio.run(run())
    assert not api.unschedulable(NODE)


def test_a_new_upgrade_keeps_an_earlier_upgrade_s_cordon(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    """Cordoned by an upgrade whose uncordon is still pending: the next upgrade owns it."""
    api.add_node(NODE, unschedulable=True)
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)
    write_intent(tmp_path / "system" / "state", UncordonIntent(NODE))

    async def run() -> list[str]:
        async with node_at(tmp_path) as node:
            steps = await node.upgrader.cordon_drain(no_drain=False)
            assert read_intent(node.paths.state) == UncordonIntent(NODE)
            return steps

    assert asyncio.run(run())[0] == "node worker-1 is still cordoned by an earlier upgrade"
    assert api.unschedulable(NODE)


def test_a_cancelled_drain_gives_the_cordon_back(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    """The client went away mid-drain: the sequence is cancelled, the node uncordoned."""
    api.add_pod("db-0", pdb_refusals=-1)
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)

    async def run() -> None:
        async with node_at(tmp_path, tuning=replace(FAST, drain_timeout=60.0)) as node:
            task = asyncio.ensure_future(node.upgrader.cordon_drain(no_drain=False))
            await until(lambda: api.pods[0].evictions > 0)
            assert api.unschedulable(NODE)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            done = "uncordoned node worker-1: the upgrade was cancelled"
            await until(lambda: done in events(node))
            assert read_intent(node.paths.state) is None

    asyncio.run(run())
    assert not api.unschedulable(NODE)


def test_a_node_no_longer_registered_has_nothing_to_uncordon(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    del api.nodes[NODE]
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)
    write_intent(tmp_path / "system" / "state", UncordonIntent(NODE))

    async def boot() -> None:
        async with node_at(tmp_path) as node:
            await _boot_good(node)
            await until(lambda: any(e.startswith("nothing to uncordon") for e in events(node)))
            assert read_intent(node.paths.state) is None

    asyncio.run(boot())


# -- rollback: the same drain before its reboot ---------------------------------------------------


def _upgraded(node: Node) -> None:
    """Slot b (0.2.0) runs, good, after an upgrade from slot a (0.1.0): a rollback can go
    back to slot a."""
    state = replace(initial_state("0.1.0"), booted=SlotName.A)
    for event in (Install("0.2.0"), Boot(), GatesPassed()):
        state = apply(state, event).state
    assert state.booted is SlotName.B
    node.upgrader.require_slots().save(state)


def test_a_rollback_drains_first_and_the_uncordon_follows_the_reboot(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    api.add_pod("web-1")
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)

    async def roll_back() -> RollbackJob:
        async with node_at(tmp_path) as node:
            _upgraded(node)
            job = RollbackJob()
            await node.sequencer.start(rollback, job)
            assert "rollback: cordoned node worker-1" in events(node)
            assert read_intent(node.paths.state) == UncordonIntent(NODE)
            return job

    job = asyncio.run(roll_back())
    assert job.steps == ["cordoned node worker-1", "evicted 1 pod"]
    assert "slot a" in job.message
    assert api.unschedulable(NODE) and [p.gone for p in api.pods] == [True]

    async def boot() -> None:  # the reboot: slot a, good
        async with node_at(tmp_path) as node:
            state = node.upgrader.require_slots().load()
            assert state is not None
            node.upgrader.require_slots().save(apply(state, Boot()).state)
            await node.upgrader.on_boot()
            node.set_stage("running")
            assert "booted slot a (0.1.0)" in [e.message for e in node.events.history()]
            await until(lambda: any(e.startswith("uncordoned") for e in events(node)))

    asyncio.run(boot())
    assert not api.unschedulable(NODE)


def test_a_rollback_with_nothing_to_go_back_to_is_refused_before_any_cordon(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)

    async def run() -> None:
        async with node_at(tmp_path) as node:
            await _boot_good(node)  # slot a only
            with pytest.raises(UpgradeRefusedError, match="rollback refused"):
                await node.sequencer.start(rollback, RollbackJob())

    asyncio.run(run())
    assert api.requests("PATCH") == [] and not api.unschedulable(NODE)


def test_a_rollback_whose_drain_fails_is_refused_and_changes_nothing(
    tmp_path: Path, api: FakeKubeApiServer, ca: CertificateAndKey, admin: CertificateAndKey
) -> None:
    api.add_pod("db-0", namespace="data", pdb_refusals=-1)
    write_kubeconfig(tmp_path, api.url, ca.crt, admin)

    async def run() -> tuple[DrainError, bool]:
        async with node_at(tmp_path, tuning=replace(FAST, drain_timeout=1.0)) as node:
            _upgraded(node)
            before = node.upgrader.require_slots().load()
            with pytest.raises(DrainError) as caught:
                await node.sequencer.start(rollback, RollbackJob())
            return caught.value, node.upgrader.require_slots().load() == before

    error, unchanged = asyncio.run(run())
    assert unchanged
    text = error.render()
    assert text.startswith("rollback refused: cannot cordon and drain node worker-1")
    assert "roll back" in text or "rollback with --no-drain" in text
    assert not api.unschedulable(NODE)
