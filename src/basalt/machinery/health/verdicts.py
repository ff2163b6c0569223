"""The decisions of the cluster health checks, on plain data (no I/O).

Each function takes what the nodes answered, keyed by node, and returns one
:class:`Outcome`. A failure names the first node (in the order given) that fails and
why; the runner in :mod:`.cluster` gathers the data and stops at the first failure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "warning", "skipped", "failed"]

#: Clocks of two nodes may differ this much (seconds) and still count as in sync.
MAX_CLOCK_SKEW = 2.0
#: Control-plane components whose static pods must run on every control plane.
CONTROL_PLANE_COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")


@dataclass(frozen=True)
class Outcome:
    """The result of one check: ``node`` is the node a failure or warning is about."""

    status: Status
    message: str
    node: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def ok(message: str) -> Outcome:
    return Outcome("ok", message)


def failed(node: str, message: str) -> Outcome:
    return Outcome("failed", f"{node}: {message}" if node else message, node)


@dataclass(frozen=True)
class EtcdMemberView:
    """One etcd member as one control plane lists it."""

    id: int
    name: str
    is_learner: bool = False


@dataclass(frozen=True)
class EtcdStatusView:
    """One control plane's etcd status: who it is, whom it follows, its errors."""

    member_id: int
    leader: int
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClockSample:
    """A node's clock read between two readings of the caller's clock (Unix seconds)."""

    sent: float
    node_time: float
    received: float

    @property
    def offset_range(self) -> tuple[float, float]:
        """The node's clock minus the caller's: somewhere in this interval."""
        return self.node_time - self.received, self.node_time - self.sent


@dataclass(frozen=True)
class TimeView:
    """What TimeStatuses says on one node (None fields: the resource's defaults)."""

    synced: bool
    servers: tuple[str, ...] = ()
    server: str = ""
    offset: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class BootView:
    """BootStatuses/boot on one node; None in :func:`boot_status` when it has none."""

    slot: str
    on_trial: bool
    fell_back_from: str = ""
    reason: str = ""


@dataclass
class Counts:
    """Nodes by role, for messages."""

    control_planes: list[str] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)

    def describe(self) -> str:
        def many(n: int, what: str) -> str:
            return f"{n} {what}{'' if n == 1 else 's'}"

        return (
            f"{many(len(self.control_planes), 'control plane')}, "
            f"{many(len(self.workers), 'worker')}"
        )


def _hex(member_id: int) -> str:
    return f"{member_id:016x}"


def reachable(errors: Mapping[str, str | None], counts: Counts) -> Outcome:
    """Every node answered (``errors``: node -> why it did not, or None)."""
    for node, error in errors.items():
        if error is not None:
            return failed(node, f"unreachable: {error}")
    return ok(f"{counts.describe()} answer")


def node_health(checks: Mapping[str, Sequence[tuple[str, bool, str]]]) -> Outcome:
    """Each node's own verdict (the Health RPC): stage, services, members, controllers,
    and its etcd view. ``checks``: node -> (name, ok, message) as the node reported.

    A node's own failures are named before its views of others (``etcd ...`` checks):
    with one member's etcd stopped, that node is the one to look at, not its peers
    that cannot reach it."""
    for node, found in checks.items():
        if not found:
            return failed(node, "reported no health checks")
    for views_of_others in (False, True):
        for node, found in checks.items():
            bad = [
                f"{name}: {message}"
                for name, good, message in found
                if not good and name.startswith("etcd") == views_of_others
            ]
            if bad:
                return failed(node, "; ".join(bad))
    services = sum(
        1 for found in checks.values() for name, _, _ in found if name.startswith("service ")
    )
    return ok(f"{services} services on {len(checks)} nodes running and healthy")


def etcd_members(
    lists: Mapping[str, Sequence[EtcdMemberView]], hostnames: Mapping[str, str]
) -> Outcome:
    """Every control plane lists the same members, none a learner, and every control
    plane (by host name) is one of them. ``hostnames``: control plane -> its host name."""
    if not lists:
        return failed("", "no control plane answered with etcd members")
    reference_node, reference = next(iter(lists.items()))
    wanted = sorted((m.id, m.name) for m in reference)
    for node, members in lists.items():
        seen = sorted((m.id, m.name) for m in members)
        if seen != wanted:
            mine = ", ".join(name or _hex(i) for i, name in seen) or "none"
            theirs = ", ".join(name or _hex(i) for i, name in wanted) or "none"
            return failed(node, f"lists etcd members {mine}; {reference_node} lists {theirs}")
        learners = [m.name or _hex(m.id) for m in members if m.is_learner]
        if learners:
            return failed(node, f"etcd member {', '.join(learners)} is still a learner")
    names = {m.name for m in reference}
    for node, hostname in hostnames.items():
        if hostname and hostname not in names:
            return failed(node, f"control plane {hostname} is not an etcd member")
    if len(lists) == 1:
        return ok(f"the control plane lists {len(reference)} member(s), itself among them")
    return ok(f"{len(lists)} control planes agree on {len(reference)} members")


def etcd_leader(statuses: Mapping[str, EtcdStatusView]) -> Outcome:
    """Every control plane follows the same leader, which is one of them, with no errors."""
    if not statuses:
        return failed("", "no control plane answered with its etcd status")
    members = {s.member_id for s in statuses.values()}
    leaders: dict[int, list[str]] = {}
    for node, status in statuses.items():
        if status.errors:
            return failed(node, f"etcd reports {'; '.join(status.errors)}")
        if status.leader == 0:
            return failed(node, "etcd has no leader")
        leaders.setdefault(status.leader, []).append(node)
    if len(leaders) > 1:
        views = "; ".join(
            f"{', '.join(nodes)} follow {_hex(leader)}" for leader, nodes in leaders.items()
        )
        first = next(iter(leaders.values()))[0]
        return failed(first, f"control planes disagree on the etcd leader: {views}")
    (leader,) = leaders
    if leader not in members:
        return failed("", f"the etcd leader {_hex(leader)} is none of the control planes")
    who = next(node for node, s in statuses.items() if s.member_id == leader)
    return ok(f"one leader: {who} ({_hex(leader)})")


def versions(tags: Mapping[str, str]) -> Outcome:
    """The same Basalt version everywhere, or a warning naming who differs."""
    by_tag: dict[str, list[str]] = {}
    for node, tag in tags.items():
        by_tag.setdefault(tag, []).append(node)
    if len(by_tag) <= 1:
        return ok(f"every node runs {next(iter(by_tag), '?')}")
    common = max(by_tag, key=lambda tag: len(by_tag[tag]))
    odd = [(node, tag) for tag, nodes in by_tag.items() if tag != common for node in nodes]
    listed = ", ".join(f"{node} runs {tag}" for node, tag in odd)
    return Outcome("warning", f"versions differ: most run {common}; {listed}", odd[0][0])


def boot_status(statuses: Mapping[str, BootView | None]) -> Outcome:
    """No node on a slot still on trial, none that fell back from a failed upgrade."""
    slots = 0
    for node, status in statuses.items():
        if status is None:
            continue
        slots += 1
        if status.on_trial:
            return failed(
                node, f"slot {status.slot} is on trial (its health gates have not passed)"
            )
        if status.fell_back_from:
            why = f": {status.reason}" if status.reason else ""
            return failed(
                node, f"fell back to slot {status.slot} from slot {status.fell_back_from}{why}"
            )
    if not slots:
        return Outcome("skipped", "no node boots from A/B slots (process or container nodes)")
    rest = len(statuses) - slots
    extra = f"; {rest} without A/B slots" if rest else ""
    return ok(f"{slots} nodes on a good slot{extra}")


def time_sync(statuses: Mapping[str, TimeView]) -> Outcome:
    """Every node whose time sync is on has synchronised its clock."""
    on = 0
    for node, status in statuses.items():
        if not status.servers:
            continue  # time sync is off (no TimeSyncConfig): nothing to have synced
        on += 1
        if not status.synced:
            why = f": {status.error}" if status.error else ""
            return failed(node, f"clock not synchronised with {', '.join(status.servers)}{why}")
    off = len(statuses) - on
    if not on:
        return Outcome("skipped", "time sync is off on every node (no TimeSyncConfig)")
    extra = f"; off on {off}" if off else ""
    return ok(f"{on} nodes synchronised{extra}")


def clock_skew(samples: Mapping[str, ClockSample], bound: float = MAX_CLOCK_SKEW) -> Outcome:
    """No two nodes' clocks differ by more than ``bound`` seconds, judged only by what the
    samples prove: each node's offset from the caller lies in an interval (the call's
    round trip), and a pair fails when even the closest ends of theirs are too far apart."""
    if len(samples) < 2:
        return Outcome("skipped", "fewer than two nodes to compare")
    ranges = {node: sample.offset_range for node, sample in samples.items()}
    for node, (low, _) in ranges.items():
        for other, (_, other_high) in ranges.items():
            gap = low - other_high
            if gap > bound:
                return failed(
                    node,
                    f"clock is at least {gap:.1f} s ahead of {other}'s (allowed {bound:.1f} s)",
                )
    widest = max(high - low for low, high in ranges.values())
    return ok(f"{len(samples)} clocks within {bound:.1f} s (measured to {widest:.2f} s)")


def _ready(item: Mapping[str, Any], kind: str) -> bool:
    conditions = (item.get("status") or {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def kubernetes_nodes(listing: Mapping[str, Any], hostnames: Iterable[str]) -> Outcome:
    """Every node with a kubelet is registered and Ready (``listing``: GET /api/v1/nodes)."""
    items = {str((i.get("metadata") or {}).get("name", "")): i for i in listing.get("items") or []}
    wanted = list(hostnames)
    for hostname in wanted:
        item = items.get(hostname)
        if item is None:
            return failed(hostname, "not registered with the Kubernetes API")
        if not _ready(item, "Ready"):
            return failed(hostname, "Kubernetes node is not Ready")
    not_ready = [name for name, item in items.items() if not _ready(item, "Ready")]
    if not_ready:
        return failed(not_ready[0], "Kubernetes node is not Ready")
    return ok(f"{len(items)} Kubernetes nodes Ready")


def control_plane_pods(listing: Mapping[str, Any], hostnames: Iterable[str]) -> Outcome:
    """kube-apiserver, kube-controller-manager and kube-scheduler run and are Ready on
    every control plane (``listing``: GET /api/v1/namespaces/kube-system/pods)."""
    pods: dict[tuple[str, str], Mapping[str, Any]] = {}
    for item in listing.get("items") or []:
        labels = (item.get("metadata") or {}).get("labels") or {}
        component = str(labels.get("component", ""))
        host = str((item.get("spec") or {}).get("nodeName", ""))
        if component in CONTROL_PLANE_COMPONENTS:
            pods[(host, component)] = item
    count = 0
    for hostname in hostnames:
        for component in CONTROL_PLANE_COMPONENTS:
            pod = pods.get((hostname, component))
            if pod is None:
                return failed(hostname, f"no {component} pod")
            phase = (pod.get("status") or {}).get("phase", "")
            if phase != "Running" or not _ready(pod, "Ready"):
                return failed(hostname, f"{component} pod is {phase or 'unknown'}, not Ready")
            count += 1
    return ok(f"{count} control-plane pods Running and Ready")
