"""The cluster health checks (machinery.health) against in-memory nodes: the real checks
and runner, the nodes' answers shaped as the API shapes them (tests/fakes/health_nodes)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from basalt.machinery.health import Progress, Targets, discover, run_checks
from basalt.machinery.health import verdicts as v
from tests.fakes.health_nodes import FakeKubeApi, FakeNodes, healthy_cluster


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        self.t += 0.01  # every reading a little later: a call takes time
        return self.t


def checks_of(
    nodes: FakeNodes, *, wait: float = 0.0, kube: Any = None, targets: Targets | None = None
) -> list[Progress]:
    async def go() -> list[Progress]:
        chosen = targets or await discover(nodes)
        return [
            p
            async for p in run_checks(
                nodes, chosen, wait=wait, kube=kube, clock=nodes.now, sleep=_no_sleep
            )
        ]

    return asyncio.run(go())


async def _no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


def ended(steps: list[Progress]) -> dict[str, Progress]:
    return {s.check: s for s in steps if s.status != "running"}


def fake() -> FakeNodes:
    return FakeNodes(healthy_cluster(), Clock())


def test_a_healthy_cluster_passes_every_check_in_order() -> None:
    steps = checks_of(fake())
    assert [s.status for s in steps[:2]] == ["running", "ok"]
    results = ended(steps)
    assert results["all nodes reachable"].message == "3 control planes, 1 worker answer"
    assert results["etcd members agree"].message == "3 control planes agree on 3 members"
    assert results["etcd has one leader"].message == "one leader: 127.0.0.1 (0000000000000001)"
    assert results["clocks agree"].status == "ok"
    assert results["Kubernetes nodes Ready"].message == "kubelet not running"
    assert all(s.status in ("ok", "skipped") for s in results.values())


def test_discovery_sorts_nodes_by_role() -> None:
    targets = asyncio.run(discover(fake()))
    assert targets.control_planes == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert targets.workers == ["127.0.0.4"]


def test_an_unreachable_node_is_the_first_failure_and_nothing_runs_after() -> None:
    nodes = fake()
    nodes.down.add("127.0.0.4")
    steps = checks_of(nodes, targets=Targets(["127.0.0.1"], ["127.0.0.4"]))
    assert steps[-1].status == "failed"
    assert steps[-1].check == "all nodes reachable"
    assert steps[-1].node == "127.0.0.4"
    assert "UNAVAILABLE: connection refused" in steps[-1].message
    assert len(steps) == 2


def test_members_that_disagree_name_the_node() -> None:
    nodes = fake()
    nodes.nodes["127.0.0.3"].etcd_members = [(1, "cp-1", False), (3, "cp-3", False)]
    last = checks_of(nodes)[-1]
    assert (last.check, last.status, last.node) == ("etcd members agree", "failed", "127.0.0.3")
    assert "lists etcd members cp-1, cp-3; 127.0.0.1 lists cp-1, cp-2, cp-3" in last.message


def test_a_learner_and_a_control_plane_outside_etcd_fail() -> None:
    nodes = fake()
    for node in list(nodes.nodes.values())[:3]:
        node.etcd_members[1] = (2, "cp-2", True)
    assert "etcd member cp-2 is still a learner" in checks_of(nodes)[-1].message
    nodes = fake()
    for node in list(nodes.nodes.values())[:3]:
        node.etcd_members = node.etcd_members[:2]
    last = checks_of(nodes)[-1]
    assert last.node == "127.0.0.3"
    assert "control plane cp-3 is not an etcd member" in last.message


def test_two_leaders_fail() -> None:
    nodes = fake()
    nodes.nodes["127.0.0.3"].etcd_leader = 3
    last = checks_of(nodes)[-1]
    assert (last.check, last.status) == ("etcd has one leader", "failed")
    assert "disagree on the etcd leader" in last.message
    assert "127.0.0.3 follow 0000000000000003" in last.message


def test_no_leader_fails() -> None:
    nodes = fake()
    nodes.nodes["127.0.0.2"].etcd_leader = 0
    last = checks_of(nodes)[-1]
    assert last.message == "127.0.0.2: etcd has no leader"


def test_a_stopped_service_names_its_node_before_peers_that_miss_it() -> None:
    nodes = fake()
    nodes.nodes["127.0.0.1"].checks.append(("etcd members", False, "cp-3: unreachable"))
    nodes.nodes["127.0.0.3"].checks[1] = ("service etcd", False, "stopped, unknown")
    last = checks_of(nodes)[-1]
    assert last.check == "all nodes healthy (stage, services, controllers)"
    assert last.message == "127.0.0.3: service etcd: stopped, unknown"


def test_versions_that_differ_warn_and_go_on() -> None:
    nodes = fake()
    nodes.nodes["127.0.0.4"].tag = "0.2.0"
    results = ended(checks_of(nodes))
    warning = results["same version everywhere"]
    assert (warning.status, warning.node) == ("warning", "127.0.0.4")
    assert warning.message == "versions differ: most run 0.1.0; 127.0.0.4 runs 0.2.0"
    assert "control-plane pods up" in results  # a warning is not a failure


@pytest.mark.parametrize(
    ("boot", "expected"),
    [
        ({"slot": "b", "onTrial": True}, "127.0.0.2: slot b is on trial"),
        (
            {"slot": "a", "onTrial": False, "fellBackFrom": "b", "reason": "tries ran out"},
            "127.0.0.2: fell back to slot a from slot b: tries ran out",
        ),
    ],
)
def test_a_trial_slot_or_a_fallback_fails(boot: dict[str, Any], expected: str) -> None:
    nodes = fake()
    for node in nodes.nodes.values():
        node.boot = {"slot": "a", "onTrial": False}
    nodes.nodes["127.0.0.2"].boot = boot
    last = checks_of(nodes)[-1]
    assert last.check == "no node on a trial slot or rolled back"
    assert last.message.startswith(expected)


def test_time_sync_on_but_not_synced_fails() -> None:
    nodes = fake()
    nodes.nodes["127.0.0.4"].time = {
        "synced": False,
        "servers": ["127.0.0.53"],
        "error": "timed out",
    }
    last = checks_of(nodes)[-1]
    assert last.check == "time in sync"
    assert last.message == "127.0.0.4: clock not synchronised with 127.0.0.53: timed out"


def test_clock_skew_beyond_the_bound_fails() -> None:
    nodes = fake()
    nodes.nodes["127.0.0.3"].clock_offset = 5.0
    last = checks_of(nodes)[-1]
    assert (last.check, last.node) == ("clocks agree", "127.0.0.3")
    assert "ahead of 127.0.0.1's (allowed 2.0 s)" in last.message


def test_clock_skew_within_what_the_round_trip_allows_passes() -> None:
    samples = {
        "a": v.ClockSample(sent=100.0, node_time=100.5, received=101.0),
        # 3 s ahead by the midpoints, but the calls took 2 s each: not proven beyond 2 s
        "b": v.ClockSample(sent=100.0, node_time=103.5, received=102.0),
    }
    assert v.clock_skew(samples).status == "ok"
    samples["b"] = v.ClockSample(sent=100.0, node_time=105.1, received=102.0)
    assert v.clock_skew(samples).failed


def test_wait_retries_a_failing_check_until_it_passes() -> None:
    nodes = fake()
    nodes.nodes["127.0.0.2"].etcd_leader = 0
    seen = {"status": 0}

    def heal_on_the_third_round(node: str, rpc: str) -> None:
        if rpc == "EtcdStatus":
            seen["status"] += 1
            if seen["status"] > 6:  # the third round of three control planes
                nodes.nodes["127.0.0.2"].etcd_leader = 1

    nodes.before_answer = heal_on_the_third_round
    results = ended(checks_of(nodes, wait=60))
    assert results["etcd has one leader"].status == "ok"
    assert seen["status"] == 9


def _kube_nodes(ready: dict[str, bool]) -> dict[str, Any]:
    return {
        "items": [
            {
                "metadata": {"name": name},
                "status": {"conditions": [{"type": "Ready", "status": str(ok)}]},
            }
            for name, ok in ready.items()
        ]
    }


def _pods(hosts: list[str], broken: tuple[str, str] | None = None) -> dict[str, Any]:
    items = []
    for host in hosts:
        for component in v.CONTROL_PLANE_COMPONENTS:
            bad = broken == (host, component)
            items.append(
                {
                    "metadata": {"name": f"{component}-{host}", "labels": {"component": component}},
                    "spec": {"nodeName": host},
                    "status": {
                        "phase": "Pending" if bad else "Running",
                        "conditions": [{"type": "Ready", "status": str(not bad)}],
                    },
                }
            )
    return {"items": items}


def _with_kubelets() -> FakeNodes:
    nodes = fake()
    for node in nodes.nodes.values():
        node.checks.append(("service kubelet", True, "running, healthy"))
        node.kubeconfig = b"kubeconfig"
    return nodes


def test_kubernetes_checks_run_when_kubelets_do() -> None:
    hosts = ["cp-1", "cp-2", "cp-3"]
    api = FakeKubeApi(
        {
            "/api/v1/nodes": (200, _kube_nodes(dict.fromkeys([*hosts, "worker-1"], True))),
            "/api/v1/namespaces/kube-system/pods": (200, _pods(hosts)),
        }
    )
    handed: list[bytes] = []

    def factory(data: bytes) -> FakeKubeApi:
        handed.append(data)
        return api

    results = ended(checks_of(_with_kubelets(), kube=factory))
    assert results["Kubernetes nodes Ready"].message == "4 Kubernetes nodes Ready"
    assert results["control-plane pods up"].message == "9 control-plane pods Running and Ready"
    assert handed == [b"kubeconfig", b"kubeconfig"]


def test_a_node_not_ready_and_a_pod_down_fail() -> None:
    hosts = ["cp-1", "cp-2", "cp-3"]
    api = FakeKubeApi(
        {
            "/api/v1/nodes": (200, _kube_nodes({"cp-1": True, "cp-2": True, "cp-3": True})),
            "/api/v1/namespaces/kube-system/pods": (200, _pods(hosts)),
        }
    )
    last = checks_of(_with_kubelets(), kube=lambda data: api)[-1]
    assert last.message == "worker-1: not registered with the Kubernetes API"
    api.answers["/api/v1/nodes"] = (200, _kube_nodes(dict.fromkeys([*hosts, "worker-1"], True)))
    api.answers["/api/v1/namespaces/kube-system/pods"] = (
        200,
        _pods(hosts, ("cp-2", "kube-scheduler")),
    )
    last = checks_of(_with_kubelets(), kube=lambda data: api)[-1]
    assert last.message == "cp-2: kube-scheduler pod is Pending, not Ready"


def test_without_the_admin_role_kubernetes_is_skipped_not_read() -> None:
    nodes = _with_kubelets()
    nodes.denied.add("Kubeconfig")
    api = FakeKubeApi({})
    results = ended(checks_of(nodes, kube=lambda data: api))
    skipped = results["Kubernetes nodes Ready"]
    assert (skipped.status, skipped.message) == (
        "skipped",
        "reading the Kubernetes API needs the os:admin role",
    )
    assert api.paths == []
