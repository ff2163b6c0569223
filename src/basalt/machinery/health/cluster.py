"""Cluster health: the checks ``basaltctl health`` runs, from a client or on a node.

One implementation for both places. The checks reach nodes only through a
:class:`NodeCaller` ("send this request to node X"): the CLI's is :class:`ClientCaller`
(one endpoint that forwards with ``-n``), a node's sends with its own certificate and
the caller's roles (``basalt.machined.api.cluster_health``), so whoever asks gets no
more than their roles allow. The decisions are the pure functions of :mod:`.verdicts`.

:func:`run_checks` yields a :class:`Progress` when a check starts and when it ends; it
stops after the first failure (re-trying a failing check until ``wait`` runs out).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from google.protobuf.message import Message

from ..api import common_pb2, machine_pb2, resource_pb2
from ..errors import BasaltError
from . import verdicts
from .callers import NodeCaller, NodeCallError, code_name, first_message
from .verdicts import Counts, Outcome

ProgressStatus = Literal["running", "ok", "warning", "skipped", "failed"]

MACHINE = "/basalt.api.v1alpha1.MachineService/"
RESOURCES = "/basalt.api.v1alpha1.ResourceService/"
#: Seconds each request may take.
CALL_TIMEOUT = 15.0
#: Seconds between tries of a failing check while ``wait`` lasts.
RETRY_INTERVAL = 1.0


class KubeAnswer(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def body(self) -> dict[str, Any]: ...


class KubeApi(Protocol):
    """The one thing the Kubernetes checks need: GET a path, JSON back."""

    async def get(self, path: str) -> KubeAnswer: ...


#: Builds a Kubernetes client from an admin kubeconfig's bytes (raises BasaltError).
KubeFactory = Callable[[bytes], KubeApi]


@dataclass(frozen=True)
class Progress:
    """One step of the checks: a check started (``running``) or ended."""

    check: str
    status: ProgressStatus
    message: str
    node: str = ""


@dataclass
class Targets:
    """The nodes to check, by role (addresses or names the endpoint can forward to)."""

    control_planes: list[str] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)

    @property
    def all(self) -> list[str]:
        return [*self.control_planes, *self.workers]


async def discover(caller: NodeCaller) -> Targets:
    """The cluster's nodes from the endpoint's Members resource (first address of each)."""
    answers = await caller.stream(
        "",
        RESOURCES + "List",
        resource_pb2.ResourceListRequest(type="Members"),
        resource_pb2.ResourceListResponse,
        CALL_TIMEOUT,
    )
    found = Targets()
    for item in answers:
        if item.metadata.error:
            raise NodeCallError(
                item.metadata.node, code_name(item.metadata.code), item.metadata.error
            )
        spec = json.loads(item.resource.spec_json or "{}")
        addresses = spec.get("addresses") or []
        if not addresses:
            continue
        role = found.control_planes if spec.get("machineType") == "controlplane" else found.workers
        if addresses[0] not in role:
            role.append(str(addresses[0]))
    if not found.all:
        raise BasaltError(
            "the endpoint knows no members to check",
            hint="name the nodes with --control-plane-nodes and --worker-nodes",
        )
    return found


class Survey:
    """Gathers what the checks need from the nodes, one request per node at a time."""

    def __init__(
        self,
        caller: NodeCaller,
        targets: Targets,
        kube: KubeFactory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.caller = caller
        self.targets = targets
        self.kube = kube
        self.clock = clock
        self.hostnames: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.kubelets: list[str] = []

    async def each(
        self, nodes: Sequence[str], rpc: str, request: Message, answer: type[Message]
    ) -> dict[str, Any]:
        """node -> its one answer message, or the NodeCallError it failed with."""

        async def one(node: str) -> Any:
            try:
                response = await self.caller.unary(node, rpc, request, answer, CALL_TIMEOUT)
                return first_message(node, response.messages)  # type: ignore[attr-defined]
            except NodeCallError as exc:
                return exc

        results = await asyncio.gather(*(one(n) for n in nodes))
        return dict(zip(nodes, results, strict=True))

    async def resource(self, nodes: Sequence[str], type_: str, id_: str) -> dict[str, Any]:
        """node -> the resource's spec (a dict), None when the node has none, or an error."""
        answers = await self.each(
            nodes,
            RESOURCES + "Get",
            resource_pb2.ResourceGetRequest(type=type_, id=id_),
            resource_pb2.ResourceGetResponse,
        )
        out: dict[str, Any] = {}
        for node, answer in answers.items():
            if isinstance(answer, NodeCallError):
                out[node] = None if answer.code == "NOT_FOUND" else answer
            else:
                out[node] = json.loads(answer.resource.spec_json or "{}")
        return out


def _first_error(answers: Mapping[str, Any]) -> Outcome | None:
    for node, answer in answers.items():
        if isinstance(answer, NodeCallError):
            return verdicts.failed(node, f"{answer.code}: {answer.detail}")
    return None


async def check_reachable(survey: Survey) -> Outcome:
    targets = survey.targets
    answers = await survey.each(
        targets.all, MACHINE + "Version", common_pb2.Empty(), machine_pb2.VersionResponse
    )
    errors: dict[str, str | None] = {}
    for node, answer in answers.items():
        if isinstance(answer, NodeCallError):
            errors[node] = f"{answer.code}: {answer.detail}"
        else:
            errors[node] = None
            survey.hostnames[node] = answer.hostname
            survey.tags[node] = answer.tag
    return verdicts.reachable(errors, Counts(targets.control_planes, targets.workers))


async def check_node_health(survey: Survey) -> Outcome:
    answers = await survey.each(
        survey.targets.all, MACHINE + "Health", common_pb2.Empty(), machine_pb2.HealthResponse
    )
    problem = _first_error(answers)
    if problem is not None:
        return problem
    survey.kubelets = [
        node
        for node, answer in answers.items()
        if any(
            c.name == "service kubelet" and c.message.startswith("running") for c in answer.checks
        )
    ]
    return verdicts.node_health(
        {n: [(c.name, c.ok, c.message) for c in a.checks] for n, a in answers.items()}
    )


async def check_etcd_members(survey: Survey) -> Outcome:
    control_planes = survey.targets.control_planes
    if not control_planes:
        return Outcome("skipped", "no control planes named")
    answers = await survey.each(
        control_planes,
        MACHINE + "EtcdMemberList",
        common_pb2.Empty(),
        machine_pb2.EtcdMemberListResponse,
    )
    problem = _first_error(answers)
    if problem is not None:
        return problem
    lists = {
        node: [verdicts.EtcdMemberView(m.id, m.hostname, m.is_learner) for m in answer.members]
        for node, answer in answers.items()
    }
    hostnames = {n: survey.hostnames.get(n, "") for n in control_planes}
    return verdicts.etcd_members(lists, hostnames)


async def check_etcd_leader(survey: Survey) -> Outcome:
    control_planes = survey.targets.control_planes
    if not control_planes:
        return Outcome("skipped", "no control planes named")
    answers = await survey.each(
        control_planes, MACHINE + "EtcdStatus", common_pb2.Empty(), machine_pb2.EtcdStatusResponse
    )
    problem = _first_error(answers)
    if problem is not None:
        return problem
    return verdicts.etcd_leader(
        {
            n: verdicts.EtcdStatusView(a.member_id, a.leader, tuple(a.errors))
            for n, a in answers.items()
        }
    )


async def check_versions(survey: Survey) -> Outcome:
    if not survey.tags:
        await check_reachable(survey)
    return verdicts.versions({n: survey.tags[n] for n in survey.targets.all if n in survey.tags})


async def check_boot(survey: Survey) -> Outcome:
    specs = await survey.resource(survey.targets.all, "BootStatuses", "boot")
    problem = _first_error(specs)
    if problem is not None:
        return problem
    return verdicts.boot_status(
        {
            n: None
            if s is None
            else verdicts.BootView(
                s.get("slot", ""),
                bool(s.get("onTrial")),
                s.get("fellBackFrom", ""),
                s.get("reason", ""),
            )
            for n, s in specs.items()
        }
    )


async def check_time_sync(survey: Survey) -> Outcome:
    specs = await survey.resource(survey.targets.all, "TimeStatuses", "node")
    problem = _first_error(specs)
    if problem is not None:
        return problem
    views = {
        n: verdicts.TimeView(
            bool(s.get("synced")),
            tuple(s.get("servers") or ()),
            s.get("server", ""),
            float(s.get("offset", 0.0)),
            s.get("error", ""),
        )
        for n, s in specs.items()
        if s is not None
    }
    return verdicts.time_sync(views)


async def check_clocks(survey: Survey) -> Outcome:
    """Each node's clock against the others', read with TimeCheck (no server asked
    that the node does not already use); nodes that do not serve it are left out."""

    async def sample(node: str) -> verdicts.ClockSample | str:
        sent = survey.clock()
        try:
            response = await survey.caller.unary(
                node,
                MACHINE + "TimeCheck",
                machine_pb2.TimeCheckRequest(),
                machine_pb2.TimeCheckResponse,
                CALL_TIMEOUT,
            )
            answer = first_message(node, response.messages)
        except NodeCallError as exc:
            return f"{exc.code}: {exc.detail}"
        return verdicts.ClockSample(sent, answer.node_time, survey.clock())

    nodes = survey.targets.all
    results = dict(zip(nodes, await asyncio.gather(*(sample(n) for n in nodes)), strict=True))
    samples = {n: r for n, r in results.items() if isinstance(r, verdicts.ClockSample)}
    outcome = verdicts.clock_skew(samples)
    left_out = sorted(n for n, r in results.items() if not isinstance(r, verdicts.ClockSample))
    if left_out and not outcome.failed:
        reasons = sorted({str(results[n]) for n in left_out})
        note = f"not compared: {', '.join(left_out)} ({'; '.join(reasons)})"
        status = outcome.status if samples else "skipped"
        return Outcome(status, f"{outcome.message}; {note}" if samples else note)
    return outcome


async def _kube_client(survey: Survey) -> KubeApi | Outcome:
    if not survey.kubelets:
        return Outcome("skipped", "kubelet not running")
    if survey.kube is None or not survey.targets.control_planes:
        return Outcome("skipped", "no control plane to ask for a kubeconfig")
    node = survey.targets.control_planes[0]
    try:
        response = await survey.caller.unary(
            node,
            MACHINE + "Kubeconfig",
            common_pb2.Empty(),
            machine_pb2.KubeconfigResponse,
            CALL_TIMEOUT,
        )
        data = first_message(node, response.messages).data
    except NodeCallError as exc:
        if exc.code == "PERMISSION_DENIED":
            return Outcome("skipped", "reading the Kubernetes API needs the os:admin role")
        return verdicts.failed(node, f"no admin kubeconfig: {exc.code}: {exc.detail}")
    try:
        return survey.kube(bytes(data))
    except BasaltError as exc:
        return verdicts.failed(node, f"the admin kubeconfig is unusable: {exc}")


async def _kube_get(survey: Survey, path: str) -> dict[str, Any] | Outcome:
    client = await _kube_client(survey)
    if isinstance(client, Outcome):
        return client
    try:
        answer = await client.get(path)
    except BasaltError as exc:
        return verdicts.failed("", str(exc))
    if not 200 <= answer.status < 300:
        return verdicts.failed(
            "", f"GET {path}: HTTP {answer.status}: {answer.body.get('message', '')}"
        )
    return answer.body


async def check_kube_nodes(survey: Survey) -> Outcome:
    listing = await _kube_get(survey, "/api/v1/nodes")
    if isinstance(listing, Outcome):
        return listing
    return verdicts.kubernetes_nodes(listing, [survey.hostnames.get(n, n) for n in survey.kubelets])


async def check_kube_pods(survey: Survey) -> Outcome:
    listing = await _kube_get(survey, "/api/v1/namespaces/kube-system/pods")
    if isinstance(listing, Outcome):
        return listing
    hostnames = [survey.hostnames.get(n, n) for n in survey.targets.control_planes]
    return verdicts.control_plane_pods(listing, hostnames)


Check = Callable[[Survey], Awaitable[Outcome]]

#: The checks in the order they run: (name, function).
CHECKS: tuple[tuple[str, Check], ...] = (
    ("all nodes reachable", check_reachable),
    ("all nodes healthy (stage, services, controllers)", check_node_health),
    ("etcd members agree", check_etcd_members),
    ("etcd has one leader", check_etcd_leader),
    ("same version everywhere", check_versions),
    ("no node on a trial slot or rolled back", check_boot),
    ("time in sync", check_time_sync),
    ("clocks agree", check_clocks),
    ("Kubernetes nodes Ready", check_kube_nodes),
    ("control-plane pods up", check_kube_pods),
)


async def run_checks(
    caller: NodeCaller,
    targets: Targets,
    *,
    wait: float = 0.0,
    kube: KubeFactory | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    checks: Sequence[tuple[str, Check]] = CHECKS,
) -> AsyncIterator[Progress]:
    """Run ``checks`` in order; a failing one is re-tried until ``wait`` seconds have
    passed since the start, then reported, and nothing after it runs."""
    survey = Survey(caller, targets, kube, clock)
    deadline = time.monotonic() + wait
    for name, check in checks:
        yield Progress(name, "running", f"waiting for {name}")
        while True:
            outcome = await check(survey)
            if not outcome.failed or time.monotonic() >= deadline:
                break
            await sleep(RETRY_INTERVAL)
        yield Progress(name, outcome.status, outcome.message, outcome.node)
        if outcome.failed:
            return
