"""The dashboard application: a tab per node (and one for the fleet), polled in the
background; the node tab shows summary, graphs, services, processes and a followed log.

Polls and the log run as Textual workers on the app's event loop, so the gRPC client
(``source.NodeAPISource``) lives on that loop too. A failed poll is shown in the summary
panel and never stops the app.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import (
    ContentSwitcher,
    DataTable,
    Footer,
    Header,
    Label,
    OptionList,
    Static,
    Tab,
    Tabs,
)

from .model import FleetSnapshot, NodeHistory, NodeSnapshot, ProcessOrder, size
from .source import FleetSource, NodeSource
from .widgets import (
    FleetClustersTable,
    FleetRolloutsTable,
    Graph,
    LogPanel,
    ProcessesTable,
    ServicesTable,
    SummaryPanel,
)

#: The node agent's own log: every node has it, so it is the log shown first.
AGENT_LOG = "machined"
FLEET_TAB = "fleet"

HELP_KEYS: tuple[tuple[str, str], ...] = (
    ("? / F1", "this help (Escape closes it)"),
    ("[ and ]", "previous / next node (tabs; the mouse works too)"),
    ("1 ... 9", "jump to the node in that tab"),
    ("f", "the fleet view (with --fleet)"),
    ("s", "pick the service whose log is shown"),
    ("Enter", "on a service row: show that service's log"),
    ("o", "order processes by CPU or by memory"),
    ("r", "poll now"),
    ("Tab", "move between panels; arrows scroll the one in focus"),
    ("q / Ctrl+C", "quit"),
)


def _tab_id(index: int) -> str:
    return f"node-{index}"


class HelpScreen(ModalScreen[None]):
    """The keys, one per line; any of Escape, q or ? closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark,f1", "dismiss", "close")
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical {
        width: 72; height: auto; border: round $accent; background: $surface; padding: 1 2;
    }
    """

    def compose(self) -> ComposeResult:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold cyan", no_wrap=True)
        grid.add_column()
        for keys, what in HELP_KEYS:
            grid.add_row(keys, what)
        with Vertical():
            yield Label(Text("basaltctl dashboard: keys", style="bold"))
            yield Static(grid, id="help-keys")
            yield Static(
                Text(
                    "Graphs: CPU and memory are the node's own samples over the last hour; "
                    "network is bytes per second in and out (loopback left out). "
                    "Processes' CPU% "
                    "is measured between two polls.",
                    style="dim",
                )
            )

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)


class ServicePicker(ModalScreen[str | None]):
    """Choose the service whose log to follow; Escape keeps the current one."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "keep")]
    DEFAULT_CSS = """
    ServicePicker { align: center middle; }
    ServicePicker > Vertical {
        width: 50; height: auto; max-height: 80%; border: round $accent;
        background: $surface; padding: 0 1;
    }
    ServicePicker OptionList { height: auto; max-height: 24; }
    """

    def __init__(self, services: list[str], current: str) -> None:
        super().__init__()
        self.services = services
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text("log of which service? (Enter picks, Escape keeps)", style="bold"))
            yield OptionList(*self.services, id="service-options")

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        if self.current in self.services:
            options.highlighted = self.services.index(self.current)
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.services[event.option_index])

    def action_cancel(self) -> None:
        self.dismiss(None)


class NodeView(Vertical):
    """Everything about the node of the active tab."""

    DEFAULT_CSS = """
    NodeView #top { height: 13; }
    NodeView #summary-box { width: 1fr; border: round $primary; }
    NodeView #graphs { width: 1fr; border: round $primary; }
    NodeView #middle { height: 1fr; }
    NodeView ServicesTable { width: 3fr; height: 1fr; border: round $primary; }
    NodeView ProcessesTable { width: 2fr; height: 1fr; border: round $primary; }
    NodeView LogPanel { height: 11; border: round $primary; }
    """

    def compose(self) -> ComposeResult:
        with Horizontal(id="top"):
            with Vertical(id="summary-box"):
                yield SummaryPanel(id="summary")
            with Vertical(id="graphs"):
                yield Graph("CPU", id="cpu-graph")
                yield Graph("memory", id="memory-graph")
                yield Graph("network", id="net-graph")
        with Horizontal(id="middle"):
            yield ServicesTable(id="services")
            yield ProcessesTable(id="processes")
        yield LogPanel(id="logs")

    def on_mount(self) -> None:
        self.query_one("#summary-box").border_title = "summary"
        self.query_one("#graphs").border_title = "graphs"
        self.query_one(ServicesTable).border_title = "services"
        self.query_one(ProcessesTable).border_title = "processes by CPU"

    def show(self, snap: NodeSnapshot | None, history: NodeHistory, order: ProcessOrder) -> None:
        self.query_one(SummaryPanel).show(snap)
        if snap is None:
            return
        self.query_one(ServicesTable).show(snap.services)
        self.query_one(ProcessesTable).show(snap.processes, order)
        title = "processes by CPU" if order == "cpu" else "processes by memory"
        self.query_one(ProcessesTable).border_title = title
        cpu, memory = snap.cpu_history, snap.memory_history
        self.query_one("#cpu-graph", Graph).show(
            cpu, 100.0, f"{cpu[-1]:.1f}%" if cpu else "", "of all CPUs, last hour"
        )
        total = snap.summary.memory_total
        used = snap.summary.memory_used or (memory[-1] if memory else 0)
        self.query_one("#memory-graph", Graph).show(
            memory, float(total), f"{size(used)} of {size(total)}" if total else "", "last hour"
        )
        rx, tx = snap.network_rx_history, snap.network_tx_history
        traffic = [a + b for a, b in zip(rx, tx, strict=False)]
        peak = max(traffic, default=0.0)
        self.query_one("#net-graph", Graph).show(
            traffic,
            max(peak * 1.25, 1024.0),
            f"in {size(int(rx[-1]))}/s out {size(int(tx[-1]))}/s" if traffic else "",
            f"peak {size(int(peak))}/s",
        )


class FleetView(Vertical):
    DEFAULT_CSS = """
    FleetView > Label { padding: 0 1; }
    FleetView FleetClustersTable { height: 1fr; border: round $primary; }
    FleetView FleetRolloutsTable { height: 1fr; border: round $primary; }
    """

    def compose(self) -> ComposeResult:
        yield Label(Text("fleet: waiting for the first answer...", style="dim"), id="fleet-title")
        yield FleetClustersTable(id="fleet-clusters")
        yield FleetRolloutsTable(id="fleet-rollouts")

    def on_mount(self) -> None:
        self.query_one(FleetClustersTable).border_title = "clusters"
        self.query_one(FleetRolloutsTable).border_title = "rollouts (newest first)"

    def show(self, snap: FleetSnapshot) -> None:
        title = Text("fleet ", style="bold")
        title.append(snap.url)
        if snap.error:
            title.append(f"   {snap.error}", style="bold red")
        else:
            health = Counter(c.health for c in snap.clusters)
            running = sum(1 for r in snap.rollouts if r.state in ("running", "paused"))
            by_health = ", ".join(f"{n} {h}" for h, n in sorted(health.items()))
            title.append(
                f"   {len(snap.clusters)} cluster(s)" + (f" ({by_health})" if by_health else "")
                + f"; {len(snap.rollouts)} rollout(s), {running} running or paused",
                style="dim",
            )  # fmt: skip
        self.query_one("#fleet-title", Label).update(title)
        self.query_one(FleetClustersTable).show(snap)
        self.query_one(FleetRolloutsTable).show(snap)


class DashboardApp(App[None]):
    """``basaltctl dashboard``: give it a node source, a fleet source, or both."""

    TITLE = "basaltctl dashboard"
    CSS = """
    Tabs { height: 2; }
    ContentSwitcher { height: 1fr; }
    NodeView, FleetView { height: 1fr; overflow: hidden; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("question_mark,f1", "help", "help", key_display="?"),
        Binding("left_square_bracket", "step(-1)", "prev node", key_display="["),
        Binding("right_square_bracket", "step(1)", "next node", key_display="]"),
        Binding("s", "pick_service", "service log"),
        Binding("o", "toggle_order", "CPU/memory order"),
        Binding("f", "fleet", "fleet", show=False),
        Binding("r", "poll", "poll now"),
        *(Binding(str(i), f"jump({i - 1})", show=False) for i in range(1, 10)),
    ]

    def __init__(
        self,
        nodes: NodeSource | None = None,
        fleet: FleetSource | None = None,
        *,
        interval: float = 2.0,
        subtitle: str = "",
    ) -> None:
        super().__init__()
        if nodes is None and fleet is None:
            raise ValueError("the dashboard needs nodes, a fleet, or both")
        self.source = nodes
        self.fleet = fleet
        self.interval = interval
        self.sub_title = subtitle
        self.node_names: list[str] = list(nodes.nodes) if nodes else []
        self.snapshots: dict[str, NodeSnapshot] = {}
        self.histories: dict[str, NodeHistory] = {n: NodeHistory() for n in self.node_names}
        self.fleet_snapshot: FleetSnapshot | None = None
        self.current: str | None = self.node_names[0] if self.node_names else None
        self.log_service = AGENT_LOG
        self.order: ProcessOrder = "cpu"

    def compose(self) -> ComposeResult:
        yield Header()
        tabs = [Tab(Text(n), id=_tab_id(i)) for i, n in enumerate(self.node_names)]
        if self.fleet is not None:
            tabs.append(Tab("fleet", id=FLEET_TAB))
        yield Tabs(*tabs)
        initial = "node-view" if self.node_names else "fleet-view"
        with ContentSwitcher(initial=initial):
            yield NodeView(id="node-view")
            yield FleetView(id="fleet-view")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(self.interval, self.action_poll)
        if self.fleet is not None:
            self.set_interval(max(self.interval * 2.5, 5.0), self.poll_fleet)
            self.poll_fleet()
        if self.current is not None:
            self.query_one(NodeView).show(None, self.histories[self.current], self.order)
            self.follow_log()
        self.action_poll()

    # -- switching -----------------------------------------------------------------------

    def on_tabs_tab_activated(self, event: Tabs.TabActivated) -> None:
        tab = event.tab.id or ""
        switcher = self.query_one(ContentSwitcher)
        if tab == FLEET_TAB:
            switcher.current = "fleet-view"
            if self.fleet_snapshot is not None:
                self.query_one(FleetView).show(self.fleet_snapshot)
            return
        switcher.current = "node-view"
        node = self.node_names[int(tab.removeprefix("node-"))]
        if node == self.current:
            return
        self.current = node
        self.query_one(NodeView).show(self.snapshots.get(node), self.histories[node], self.order)
        self.follow_log()
        self.action_poll()

    def action_step(self, delta: int) -> None:
        tabs = self.query_one(Tabs)
        if delta > 0:
            tabs.action_next_tab()
        else:
            tabs.action_previous_tab()

    def action_jump(self, index: int) -> None:
        if index < len(self.node_names):
            self.query_one(Tabs).active = _tab_id(index)

    def action_fleet(self) -> None:
        if self.fleet is not None:
            self.query_one(Tabs).active = FLEET_TAB

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_toggle_order(self) -> None:
        self.order = "memory" if self.order == "cpu" else "cpu"
        self._redraw()

    def action_pick_service(self) -> None:
        if self.current is None:
            return
        snap = self.snapshots.get(self.current)
        names = sorted({AGENT_LOG, *(s.id for s in (snap.services if snap else ()))})
        self.push_screen(ServicePicker(names, self.log_service), self._picked)

    def _picked(self, service: str | None) -> None:
        if service and service != self.log_service:
            self.log_service = service
            self.follow_log()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if isinstance(event.data_table, ServicesTable) and event.row_key.value:
            self._picked(str(event.row_key.value))

    # -- polling -------------------------------------------------------------------------

    def action_poll(self) -> None:
        if self.current is not None:
            self.poll_node(self.current)

    @work(group="poll", exclusive=True, exit_on_error=False)
    async def poll_node(self, node: str) -> None:
        assert self.source is not None
        try:
            snap = await self.source.snapshot(node)
        except Exception as exc:  # the source's own failure (no client config, ...)
            snap = NodeSnapshot(node=node, taken=0.0, errors={"connection": str(exc)})
        self.snapshots[node] = self.histories[node].update(snap)
        if node == self.current:
            self._redraw()

    def _redraw(self) -> None:
        if self.current is not None:
            node = self.current
            self.query_one(NodeView).show(
                self.snapshots.get(node), self.histories[node], self.order
            )

    @work(group="fleet", exclusive=True, exit_on_error=False)
    async def poll_fleet(self) -> None:
        assert self.fleet is not None
        try:
            snap = await self.fleet.snapshot()
        except Exception as exc:
            snap = FleetSnapshot(url=self.fleet.url, error=str(exc))
        self.fleet_snapshot = snap
        self.query_one(FleetView).show(snap)

    @work(group="logs", exclusive=True, exit_on_error=False)
    async def follow_log(self) -> None:
        if self.source is None or self.current is None:
            return
        node, service = self.current, self.log_service
        panel = self.query_one(LogPanel)
        panel.start(node, service)
        try:
            async for line in self.source.logs(node, service):
                panel.write(line)
        except Exception as exc:  # the stream broke: say so in the panel, keep the app
            panel.write(f"[log of {service} on {node} ended: {_short(exc)}]")

    async def on_unmount(self) -> None:
        self.workers.cancel_all()
        if self.source is not None:
            await self.source.close()


def _short(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        return str(details())
    return str(exc) or type(exc).__name__


__all__ = ["DashboardApp", "FleetView", "HelpScreen", "NodeView", "ServicePicker"]
