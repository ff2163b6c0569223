"""Data sources for the dashboard's widget tests: nodes and a fleet that answer from
tables, count what they were asked, and stream logs that the test can add lines to.

They implement ``basalt.cli.dashboard.source``'s protocols the way the real sources do:
a snapshot per poll (with a part that failed named in ``errors``), a log that yields its
recent lines and then waits for new ones until it is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from basalt.cli.dashboard.model import (
    FleetCluster,
    FleetRollout,
    FleetSnapshot,
    NodeSnapshot,
    Process,
    Service,
    Summary,
)


def sample_node(node: str, hostname: str, machine_type: str = "controlplane") -> NodeSnapshot:
    """A plausible node: machined's services, a few processes, an hour of samples."""
    services = [
        Service("apid", "Running", "healthy"),
        Service("containerd", "Running", "healthy"),
        Service("trustd", "Running", "healthy"),
        Service("kubelet", "Waiting", "unknown", 2, "waiting for the node's certificate"),
    ]
    if machine_type == "controlplane":
        services.append(Service("etcd", "Running", "healthy"))
    return NodeSnapshot(
        node=node,
        taken=1000.0,
        summary=Summary(
            hostname=hostname,
            machine_type=machine_type,
            version="v0.1.0",
            mode="normal",
            platform="container",
            stage="running",
            ready=True,
            slot="A",
            boot="good",
            started=1000.0 - 3725,
            addresses=(node,),
            etcd="leader" if machine_type == "controlplane" else "none (worker)",
            update="up-to-date, channel stable",
            memory_total=8 * 1024**3,
            memory_used=3 * 1024**3,
        ),
        services=services,
        processes=[
            Process(1, "machined --platform container", 120.0, 90 * 1024**2, 4.0),
            Process(40, "containerd", 30.0, 60 * 1024**2, 12.5),
            Process(77, "etcd --name cp-1", 300.0, 200 * 1024**2, 1.5),
        ],
        cpu_history=[5.0, 7.5, 30.0, 12.0, 8.0],
        memory_history=[2.5 * 1024**3, 2.8 * 1024**3, 3.0 * 1024**3],
        network_rx_history=[1500.0, 64000.0, 2048.0],
        network_tx_history=[700.0, 3000.0, 512.0],
    )


@dataclass
class FakeNodes:
    """Nodes answering from ``snapshots``; ``log_lines[(node, service)]`` is each log."""

    snapshots: dict[str, NodeSnapshot]
    log_lines: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    polls: list[str] = field(default_factory=list)
    opened_logs: list[tuple[str, str]] = field(default_factory=list)
    closed: bool = False
    _new: dict[tuple[str, str], asyncio.Queue[str]] = field(default_factory=dict)

    @property
    def nodes(self) -> Sequence[str]:
        return list(self.snapshots)

    async def snapshot(self, node: str) -> NodeSnapshot:
        self.polls.append(node)
        if node not in self.snapshots:
            raise ConnectionError(f"{node}: no such node")
        return self.snapshots[node]

    async def logs(self, node: str, service: str) -> AsyncIterator[str]:
        self.opened_logs.append((node, service))
        queue = self._new.setdefault((node, service), asyncio.Queue())
        for line in self.log_lines.get((node, service), []):
            yield line
        while True:
            yield await queue.get()

    def append_log(self, node: str, service: str, line: str) -> None:
        """A new line in a followed log (reaches a follower that is open)."""
        self._new.setdefault((node, service), asyncio.Queue()).put_nowait(line)

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeFleet:
    url: str = "https://127.0.0.1:18443"
    snapshots: list[FleetSnapshot] = field(default_factory=list)
    polls: int = 0

    async def snapshot(self) -> FleetSnapshot:
        self.polls += 1
        return self.snapshots[min(self.polls, len(self.snapshots)) - 1]


def sample_fleet(url: str = "https://127.0.0.1:18443") -> FleetSnapshot:
    return FleetSnapshot(
        url=url,
        clusters=[
            FleetCluster("prod", "ready", 3, 5, 0, "https://127.0.0.50:6443", "", 8, 8),
            FleetCluster("edge", "ready", 1, 2, 1, "", "", 3, 2),
            FleetCluster("lab", "applying", 1, 0, 0, "", "checking nodes", 1, 1),
        ],
        rollouts=[
            FleetRollout(7, "0.3.0", "stable", "running", "1/3", 4, 8, 0, ("prod",)),
            FleetRollout(6, "0.2.1", "beta", "done", "2/2", 3, 3, 0, ("edge",)),
        ],
    )
