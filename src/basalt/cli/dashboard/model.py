"""What the dashboard shows, as plain data: one node's snapshot, a fleet's, and the small
pure calculations over them (CPU share of processes between two polls, uptime, sizes).

No Textual and no gRPC here: the widgets read these, the sources (``source.py``, the
fakes under ``tests/fakes``) write them, and the unit tests check the arithmetic alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

#: How processes are ordered: by CPU use since the last poll, or by resident memory.
ProcessOrder = Literal["cpu", "memory"]


@dataclass(frozen=True)
class Service:
    """One supervised service (``ServiceList``)."""

    id: str
    state: str
    health: str
    restarts: int = 0
    message: str = ""


@dataclass(frozen=True)
class Process:
    """One process (``Processes``); ``cpu`` is percent of one CPU since the last poll."""

    pid: int
    command: str
    cpu_time: float
    resident_memory: int
    cpu: float = 0.0


@dataclass(frozen=True)
class Summary:
    """The node at a glance; an empty string means "not known" (the UI shows a dash)."""

    hostname: str = ""
    machine_type: str = ""
    version: str = ""
    mode: str = ""
    platform: str = ""
    stage: str = ""
    ready: bool | None = None
    slot: str = ""
    boot: str = ""
    started: float = 0.0
    addresses: tuple[str, ...] = ()
    etcd: str = ""
    update: str = ""
    memory_total: int = 0
    memory_used: int = 0


@dataclass
class NodeSnapshot:
    """One poll of one node. ``errors`` names each part that could not be read (the
    rest is still shown), e.g. ``{"etcd": "FAILED_PRECONDITION: not a control plane"}``."""

    node: str
    taken: float
    summary: Summary = field(default_factory=Summary)
    services: list[Service] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)
    #: The node's own hour of samples (SystemStats/history): CPU percent, memory bytes.
    cpu_history: list[float] = field(default_factory=list)
    memory_history: list[float] = field(default_factory=list)
    #: Bytes per second received and sent (all interfaces but loopback), same samples.
    network_rx_history: list[float] = field(default_factory=list)
    network_tx_history: list[float] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def reachable(self) -> bool:
        """False when nothing at all could be read (the node or its endpoint is down)."""
        return not (self.errors and not self.summary.version and not self.services)


@dataclass(frozen=True)
class FleetCluster:
    name: str
    status: str
    controlplanes: int
    workers: int
    drifted: int
    endpoint: str
    message: str = ""
    #: Nodes of the cluster and how many of them hold a link to the fleet now.
    nodes: int = 0
    linked: int = 0

    @property
    def health(self) -> str:
        """As the fleet's web UI says it: failed, degraded (a node's link is down), ok
        (ready, every node linked), or the status while it is applied or deleted."""
        if self.status == "failed":
            return "failed"
        if self.linked < self.nodes:
            return "degraded"
        return "ok" if self.status == "ready" else self.status


@dataclass(frozen=True)
class FleetRollout:
    id: int
    version: str
    channel: str
    state: str
    wave: str
    healthy: int
    machines: int
    failed: int
    clusters: tuple[str, ...]


@dataclass
class FleetSnapshot:
    """One poll of a Basalt Fleet: its clusters and its rollouts, newest first."""

    url: str
    clusters: list[FleetCluster] = field(default_factory=list)
    rollouts: list[FleetRollout] = field(default_factory=list)
    error: str = ""


def with_cpu_share(
    before: Sequence[Process], now: Sequence[Process], seconds: float
) -> list[Process]:
    """``now`` with each process's CPU percent since ``before`` (``seconds`` earlier).

    A process not seen before (or a reused pid whose CPU time went down) has no share
    yet: 0. One busy CPU is 100.
    """
    if seconds <= 0:
        return list(now)
    previous = {p.pid: p.cpu_time for p in before}
    out = []
    for process in now:
        earlier = previous.get(process.pid)
        used = process.cpu_time - earlier if earlier is not None else 0.0
        share = max(used, 0.0) / seconds * 100
        out.append(
            Process(process.pid, process.command, process.cpu_time, process.resident_memory, share)
        )
    return out


def ordered(processes: Sequence[Process], order: ProcessOrder) -> list[Process]:
    """Largest first by ``order``; ties by pid so rows do not jump around."""
    if order == "cpu":
        return sorted(processes, key=lambda p: (-p.cpu, -p.resident_memory, p.pid))
    return sorted(processes, key=lambda p: (-p.resident_memory, p.pid))


def etcd_role(member_id: int, leader: int, is_learner: bool) -> str:
    if is_learner:
        return "learner"
    if leader == 0:
        return "no leader"
    return "leader" if member_id == leader else "follower"


def boot_text(spec: Mapping[str, Any]) -> tuple[str, str]:
    """(slot, boot status) from a BootStatuses spec (camelCase JSON)."""
    slot = str(spec.get("slot") or "")
    if spec.get("fellBackFrom"):
        status = f"fell back from {spec['fellBackFrom']}: {spec.get('reason') or 'no reason given'}"
    elif spec.get("onTrial"):
        tries = spec.get("triesLeft")
        status = "on trial" + (f", {tries} tries left" if tries is not None else "")
    else:
        status = "good"
    return slot, status


def update_text(spec: Mapping[str, Any]) -> str:
    """One line from an UpdateStatuses spec: state, then what matters for that state."""
    state = str(spec.get("state") or "disabled")
    parts = [state]
    if spec.get("channel"):
        parts.append(f"channel {spec['channel']}")
    if spec.get("available") and state not in ("up-to-date", "disabled"):
        parts.append(f"available {spec['available']}")
    if spec.get("nextHop") and spec.get("nextHop") != spec.get("available"):
        parts.append(f"next {spec['nextHop']}")
    if spec.get("lastError"):
        parts.append(f"error: {spec['lastError']}")
    return ", ".join(parts)


def duration(seconds: float) -> str:
    """``3725`` -> ``1h02m``; ``90061`` -> ``1d01h``; under a minute: ``42s``."""
    whole = int(max(seconds, 0))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def size(count: float) -> str:
    """Bytes in binary units, short: ``1.5 GiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class NodeHistory:
    """What the client remembers of a node between polls: the processes of the last one
    (for CPU shares)."""

    def __init__(self) -> None:
        self._processes: list[Process] = []
        self._taken = 0.0

    def update(self, snap: NodeSnapshot) -> NodeSnapshot:
        """``snap`` with CPU shares filled in; remembers it for the next poll."""
        if snap.processes:
            if self._taken and not any(p.cpu for p in snap.processes):
                snap.processes = with_cpu_share(
                    self._processes, snap.processes, snap.taken - self._taken
                )
            self._processes, self._taken = list(snap.processes), snap.taken
        return snap


_BLOCKS = " ▁▂▃▄▅▆▇█"


def bars(values: Sequence[float], width: int, top: float, rows: int = 2) -> list[str]:
    """A bar graph of ``values`` on a fixed scale (0 .. ``top``), ``rows`` lines high and
    ``width`` columns wide, newest at the right; older values than fit are dropped, and
    several values per column (when there are more than ``width``) show their maximum.

    A fixed scale so that a flat line at 5 % does not fill the panel as a flat 95 % would.
    """
    if width <= 0 or rows <= 0:
        return [""] * max(rows, 0)
    if top <= 0:  # no scale yet (the node's memory size unknown): draw nothing
        return [" " * width] * rows
    series = list(values)
    per = max(1, -(-len(series) // width))  # values per column, rounded up
    columns = [max(series[max(i - per, 0) : i]) for i in range(len(series), 0, -per)][::-1]
    columns = columns[-width:]
    steps = rows * 8
    levels = [round(min(max(v / top, 0.0), 1.0) * steps) for v in columns]
    levels = [max(level, 1) if v > 0 else 0 for level, v in zip(levels, columns, strict=True)]
    pad = width - len(levels)
    lines = []
    for row in range(rows - 1, -1, -1):
        line = "".join(_BLOCKS[min(max(level - row * 8, 0), 8)] for level in levels)
        lines.append(" " * pad + line)
    return lines
