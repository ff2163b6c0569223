"""The dashboard's panels. Each one is given plain data (``model.py``) and draws it; none
of them talks to a node. Text from nodes is always drawn as text, never as markup.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Label, Log, Static

from .model import (
    FleetSnapshot,
    NodeSnapshot,
    Process,
    ProcessOrder,
    Service,
    bars,
    duration,
    ordered,
    size,
)

#: Process rows shown (the busiest; the panel scrolls no further than this).
PROCESS_ROWS = 30

_STATE_STYLE = {"running": "green", "finished": "dim", "failed": "bold red", "waiting": "yellow"}
_HEALTH_STYLE = {"healthy": "green", "unhealthy": "bold red", "unknown": "dim"}
_FLEET_HEALTH_STYLE = {"ok": "green", "failed": "bold red", "degraded": "bold yellow"}


def _dash(value: str) -> Text:
    return Text(value) if value else Text("-", style="dim")


class SummaryPanel(Static):
    """The node at a glance: who it is, what it runs, how it booted, its update."""

    DEFAULT_CSS = "SummaryPanel { padding: 0 1; }"

    def show(self, snap: NodeSnapshot | None) -> None:
        if snap is None:
            self.update(Text("waiting for the first answer...", style="dim"))
            return
        s = snap.summary
        now = snap.taken or time.time()
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold cyan", no_wrap=True)
        grid.add_column(overflow="fold")
        ready = {True: " (ready)", False: " (not ready)", None: ""}[s.ready]
        memory = f"{size(s.memory_used)} of {size(s.memory_total)}" if s.memory_total else ""
        rows = [
            ("node", f"{snap.node}  {s.hostname}".strip()),
            ("type", " ".join(v for v in (s.machine_type, s.platform) if v)),
            ("basalt", f"{s.version}  ({s.mode})" if s.version and s.mode else s.version),
            ("stage", f"{s.stage}{ready}" if s.stage else ""),
            ("slot", f"{s.slot}: {s.boot}" if s.slot else s.boot),
            ("uptime", duration(now - s.started) + " (agent)" if s.started else ""),
            ("addresses", ", ".join(s.addresses)),
            ("etcd", s.etcd),
            ("update", s.update),
            ("memory", memory),
        ]
        for label, value in rows:
            grid.add_row(label, _dash(value))
        for part, error in sorted(snap.errors.items()):
            grid.add_row(Text(part, style="bold red"), Text(error, style="red"))
        self.update(grid)


class Graph(Vertical):
    """A titled bar graph on a fixed scale: the title carries the latest value."""

    DEFAULT_CSS = """
    Graph { height: 3; padding: 0 1; }
    Graph > Label { width: 1fr; height: 1; }
    Graph > .bars { height: 2; color: $accent; }
    """

    def __init__(self, title: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.title = title
        self.values: list[float] = []
        self.top = 0.0

    def compose(self) -> ComposeResult:
        yield Label(Text(f"{self.title}: -"))
        yield Static(markup=False, classes="bars")

    def show(self, values: Sequence[float], top: float, latest: str, note: str = "") -> None:
        """``values`` from oldest to newest, drawn from 0 up to ``top``."""
        title = Text(f"{self.title}: ", style="bold", no_wrap=True, overflow="ellipsis")
        title.append(latest or "-")
        if note:
            title.append(f"  {note}", style="dim")
        self.query_one(Label).update(title)
        self.values, self.top = list(values), top
        self._draw()

    def on_resize(self) -> None:
        self._draw()

    def _draw(self) -> None:
        width = self.content_region.width
        self.query_one(".bars", Static).update(Text("\n".join(bars(self.values, width, self.top))))


class ServicesTable(DataTable[Text]):
    """Services with state, health, restarts and message; Enter picks one for the log."""

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        self.add_columns("SERVICE", "STATE", "HEALTH", "RESTARTS", "MESSAGE")

    def show(self, services: Sequence[Service]) -> None:
        keep = self.cursor_row
        self.clear()
        for svc in sorted(services, key=lambda s: s.id):
            self.add_row(
                Text(svc.id),
                Text(svc.state, style=_STATE_STYLE.get(svc.state.lower(), "")),
                Text(svc.health, style=_HEALTH_STYLE.get(svc.health, "")),
                Text(str(svc.restarts)),
                Text(svc.message),
                key=svc.id,
            )
        if self.row_count:
            self.move_cursor(row=min(keep, self.row_count - 1))


class ProcessesTable(DataTable[Text]):
    """The busiest processes, by CPU (since the last poll) or by resident memory."""

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns("PID", "CPU%", "MEMORY", "COMMAND")

    def show(self, processes: Sequence[Process], order: ProcessOrder) -> None:
        self.clear()
        for p in ordered(processes, order)[:PROCESS_ROWS]:
            self.add_row(
                Text(str(p.pid), justify="right"),
                Text(f"{p.cpu:.1f}", justify="right"),
                Text(size(p.resident_memory), justify="right"),
                Text(p.command, overflow="ellipsis", no_wrap=True),
            )


class LogPanel(Vertical):
    """One service's log on one node, followed; the title says which."""

    DEFAULT_CSS = """
    LogPanel > Label { padding: 0 1; background: $boost; width: 1fr; }
    LogPanel > Log { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Label(Text("logs: pick a service with s (or Enter on one)"), id="log-title")
        yield Log(max_lines=2000, auto_scroll=True)

    def start(self, node: str, service: str) -> None:
        title = Text("logs: ", style="bold")
        title.append(f"{service} on {node}")
        title.append("   (s: another service)", style="dim")
        self.query_one(Label).update(title)
        self.query_one(Log).clear()

    def write(self, line: str) -> None:
        self.query_one(Log).write_line(line)

    @property
    def lines(self) -> Sequence[str]:
        return list(self.query_one(Log).lines)


class FleetClustersTable(DataTable[Text]):
    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns(
            "CLUSTER", "HEALTH", "STATUS", "LINKED", "CONTROL PLANES", "WORKERS", "DRIFTED",
            "ENDPOINT",
        )  # fmt: skip

    def show(self, snap: FleetSnapshot) -> None:
        self.clear()
        for c in snap.clusters:
            health = Text(c.health, style=_FLEET_HEALTH_STYLE.get(c.health, "yellow"))
            status = Text(c.status)
            if c.message:
                status.append(f" ({c.message})", style="dim")
            self.add_row(
                Text(c.name),
                health,
                status,
                Text(f"{c.linked}/{c.nodes}"),
                Text(str(c.controlplanes)),
                Text(str(c.workers)),
                Text(str(c.drifted), style="yellow" if c.drifted else ""),
                Text(c.endpoint),
            )


class FleetRolloutsTable(DataTable[Text]):
    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns(
            "ROLLOUT", "VERSION", "CHANNEL", "STATE", "WAVE", "PROGRESS", "FAILED", "CLUSTERS"
        )

    def show(self, snap: FleetSnapshot) -> None:
        self.clear()
        for r in snap.rollouts:
            filled = round(20 * r.healthy / r.machines) if r.machines else 20
            bar = "#" * filled + "." * (20 - filled)
            self.add_row(
                Text(str(r.id)),
                Text(r.version),
                Text(r.channel),
                Text(r.state),
                Text(r.wave),
                Text(f"[{bar}] {r.healthy}/{r.machines}"),
                Text(str(r.failed), style="bold red" if r.failed else ""),
                Text(", ".join(r.clusters)),
            )
