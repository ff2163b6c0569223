"""``basaltctl dashboard`` headless, with Textual's pilot and the fake sources of
``tests/fakes/dashboard_source.py``: what is on screen, the keys, the tabs, the service
picker, the help screen, the fleet view; and the pure arithmetic of ``model.py``.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from rich.text import Text
from textual.widgets import ContentSwitcher

from basalt.cli.dashboard.app import DashboardApp, HelpScreen, ServicePicker
from basalt.cli.dashboard.model import (
    FleetCluster,
    NodeHistory,
    NodeSnapshot,
    Process,
    bars,
    boot_text,
    duration,
    etcd_role,
    ordered,
    update_text,
    with_cpu_share,
)
from basalt.cli.dashboard.widgets import (
    FleetClustersTable,
    LogPanel,
    ProcessesTable,
    ServicesTable,
    SummaryPanel,
)
from tests.fakes.dashboard_source import FakeFleet, FakeNodes, sample_fleet, sample_node

CP, WORKER = "127.0.0.10", "127.0.0.11"
SIZE = (120, 40)


def nodes() -> FakeNodes:
    return FakeNodes(
        {CP: sample_node(CP, "cp-1"), WORKER: sample_node(WORKER, "worker-1", "worker")},
        log_lines={
            (CP, "machined"): ["cp agent line 1", "cp agent line 2"],
            (WORKER, "machined"): ["worker agent line"],
            (CP, "etcd"): ["etcd: elected leader [red]not markup[/red]"],
        },
    )


def drive(app: DashboardApp, steps: Callable[[Any], Awaitable[None]]) -> None:
    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await steps(pilot)

    asyncio.run(main())


async def settle(pilot: Any, until: Callable[[], bool] = lambda: True, timeout: float = 5) -> None:
    """Let workers run until ``until()`` holds (they are async: one pause is not enough)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        await pilot.pause(0.05)
        if until() or loop.time() > deadline:
            return


def text_of(widget: Any) -> str:
    """What a panel draws, as plain text (its last rendered content)."""
    from rich.console import Console

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(widget.content)
    return console.export_text()


def cells(table: Any) -> list[list[str]]:
    return [
        [c.plain if isinstance(c, Text) else str(c) for c in table.get_row_at(i)]
        for i in range(table.row_count)
    ]


# -- the app, with fake nodes ------------------------------------------------------------


def test_first_node_is_shown_with_summary_services_processes_and_its_agent_log() -> None:
    source = nodes()
    app = DashboardApp(source, interval=60)

    async def steps(pilot: Any) -> None:
        await settle(pilot, lambda: len(app.query_one(LogPanel).lines) == 2)
        summary = text_of(app.query_one(SummaryPanel))
        for expected in ("cp-1", "v0.1.0", "A: good", "1h02m", "leader", "up-to-date", CP):
            assert expected in summary, (expected, summary)
        services = cells(app.query_one(ServicesTable))
        assert [row[0] for row in services] == ["apid", "containerd", "etcd", "kubelet", "trustd"]
        assert services[3][1:4] == ["Waiting", "unknown", "2"]
        processes = cells(app.query_one(ProcessesTable))
        assert [row[0] for row in processes] == ["40", "1", "77"]  # by CPU, busiest first
        assert app.query_one(LogPanel).lines == ["cp agent line 1", "cp agent line 2"]
        assert source.polls[0] == CP and source.opened_logs == [(CP, "machined")]

    drive(app, steps)


def test_brackets_and_digits_switch_node_and_its_log() -> None:
    source = nodes()
    app = DashboardApp(source, interval=60)

    async def steps(pilot: Any) -> None:
        await pilot.press("right_square_bracket")
        await settle(pilot, lambda: app.query_one(LogPanel).lines == ["worker agent line"])
        assert app.current == WORKER
        assert "worker-1" in text_of(app.query_one(SummaryPanel))
        assert "none (worker)" in text_of(app.query_one(SummaryPanel))
        assert "etcd" not in [row[0] for row in cells(app.query_one(ServicesTable))]
        assert source.polls[-1] == WORKER
        await pilot.press("1")
        await settle(pilot, lambda: app.current == CP)
        assert app.current == CP
        await pilot.press("left_square_bracket")  # wraps around to the last tab
        await settle(pilot)
        assert app.current == WORKER
        assert source.opened_logs == [(CP, "machined"), (WORKER, "machined"), (CP, "machined"),
                                      (WORKER, "machined")]  # fmt: skip

    drive(app, steps)


def test_service_picker_changes_the_followed_log_and_escape_keeps_it() -> None:
    source = nodes()
    app = DashboardApp(source, interval=60)

    async def steps(pilot: Any) -> None:
        await pilot.press("s")
        await settle(pilot, lambda: isinstance(app.screen, ServicePicker))
        assert isinstance(app.screen, ServicePicker)
        assert app.screen.services == ["apid", "containerd", "etcd", "kubelet", "machined",
                                       "trustd"]  # fmt: skip
        await pilot.press("escape")
        await settle(pilot)
        assert app.log_service == "machined"
        await pilot.press("s")
        await settle(pilot, lambda: isinstance(app.screen, ServicePicker))
        await pilot.press("up", "up", "enter")  # from machined up to etcd
        await settle(pilot, lambda: len(app.query_one(LogPanel).lines) == 1)
        assert app.log_service == "etcd"
        # A log line is shown as written: brackets are not markup.
        assert app.query_one(LogPanel).lines == ["etcd: elected leader [red]not markup[/red]"]
        title = text_of(app.query_one("#log-title"))
        assert "etcd on 127.0.0.10" in title
        source.append_log(CP, "etcd", "a new line")
        await settle(pilot, lambda: len(app.query_one(LogPanel).lines) == 2)
        assert app.query_one(LogPanel).lines[-1] == "a new line"

    drive(app, steps)


def test_enter_on_a_service_row_picks_its_log() -> None:
    app = DashboardApp(nodes(), interval=60)

    async def steps(pilot: Any) -> None:
        app.query_one(ServicesTable).focus()
        await pilot.press("down", "down", "enter")  # apid, containerd, etcd
        await settle(pilot, lambda: app.log_service == "etcd")
        assert app.log_service == "etcd"

    drive(app, steps)


def test_o_orders_processes_by_memory_and_back() -> None:
    app = DashboardApp(nodes(), interval=60)

    async def steps(pilot: Any) -> None:
        await pilot.press("o")
        await settle(pilot)
        assert [r[0] for r in cells(app.query_one(ProcessesTable))] == ["77", "1", "40"]
        assert app.query_one(ProcessesTable).border_title == "processes by memory"
        await pilot.press("o")
        await settle(pilot)
        assert [r[0] for r in cells(app.query_one(ProcessesTable))] == ["40", "1", "77"]

    drive(app, steps)


def test_help_screen_opens_on_question_mark_and_closes_on_escape() -> None:
    app = DashboardApp(nodes(), interval=60)

    async def steps(pilot: Any) -> None:
        await pilot.press("question_mark")
        await settle(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert isinstance(app.screen, HelpScreen)
        keys = text_of(app.screen.query_one("#help-keys"))
        for key in ("[ and ]", "service", "quit", "CPU or by memory"):
            assert key in keys
        await pilot.press("escape")
        await settle(pilot)
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("q")
        await settle(pilot)

    drive(app, steps)
    assert app.return_code == 0


def test_a_failing_part_is_named_and_the_rest_still_shown() -> None:
    source = nodes()
    source.snapshots[CP].errors["etcd"] = "PERMISSION_DENIED: needs os:etcd:reader"
    app = DashboardApp(source, interval=60)

    async def steps(pilot: Any) -> None:
        summary = text_of(app.query_one(SummaryPanel))
        assert "PERMISSION_DENIED: needs os:etcd:reader" in summary
        assert "cp-1" in summary

    drive(app, steps)


def test_a_source_that_raises_is_shown_as_the_nodes_error() -> None:
    source = nodes()
    source.snapshots["127.0.0.12"] = sample_node("127.0.0.12", "gone")
    app = DashboardApp(source, interval=60)
    del source.snapshots["127.0.0.12"]  # a tab for it exists; its polls now fail

    async def steps(pilot: Any) -> None:
        await pilot.press("3")
        await settle(pilot, lambda: "127.0.0.12" in app.snapshots)
        summary = text_of(app.query_one(SummaryPanel))
        assert "connection" in summary and "no such node" in summary
        assert app.is_running

    drive(app, steps)


def test_fleet_view_with_nodes_f_and_tabs() -> None:
    fleet = FakeFleet(snapshots=[sample_fleet()])
    app = DashboardApp(nodes(), fleet, interval=60)

    async def steps(pilot: Any) -> None:
        await pilot.press("f")
        await settle(pilot, lambda: app.query_one(ContentSwitcher).current == "fleet-view")
        rows = cells(app.query_one(FleetClustersTable))
        assert [r[:4] for r in rows] == [
            ["prod", "ok", "ready", "8/8"],
            ["edge", "degraded", "ready", "2/3"],
            ["lab", "applying", "applying (checking nodes)", "1/1"],
        ]
        title = text_of(app.query_one("#fleet-title"))
        assert (
            "3 cluster(s) (1 applying, 1 degraded, 1 ok); 2 rollout(s), 1 running or paused"
            in title
        )
        rollouts = cells(app.query_one("#fleet-rollouts"))
        assert rollouts[0][:6] == ["7", "0.3.0", "stable", "running", "1/3",
                                   "[##########..........] 4/8"]  # fmt: skip
        await pilot.press("1")
        await settle(pilot, lambda: app.query_one(ContentSwitcher).current == "node-view")
        assert app.current == CP

    drive(app, steps)


def test_fleet_only_dashboard() -> None:
    app = DashboardApp(None, FakeFleet(snapshots=[sample_fleet()]), interval=60)

    async def steps(pilot: Any) -> None:
        await settle(pilot, lambda: app.fleet_snapshot is not None)
        assert app.query_one(ContentSwitcher).current == "fleet-view"
        assert len(cells(app.query_one(FleetClustersTable))) == 3
        await pilot.press("s", "right_square_bracket", "o")  # node keys: harmless here
        await settle(pilot)
        assert app.is_running

    drive(app, steps)


def test_closing_the_app_closes_the_source(tmp_path: Any) -> None:
    source = nodes()
    app = DashboardApp(source, interval=60)

    async def steps(pilot: Any) -> None:
        app.save_screenshot("dashboard.svg", str(tmp_path))
        await pilot.press("q")

    drive(app, steps)
    assert source.closed
    screen = (tmp_path / "dashboard.svg").read_text()
    assert "cp-1" in screen and "processes" in screen


# -- the arithmetic ----------------------------------------------------------------------


def test_cpu_share_between_polls() -> None:
    before = [Process(1, "a", 10.0, 5), Process(2, "b", 4.0, 9), Process(3, "old", 50.0, 1)]
    now = [Process(1, "a", 12.0, 5), Process(2, "b", 3.0, 9), Process(4, "new", 1.0, 1)]
    shares = {p.pid: p.cpu for p in with_cpu_share(before, now, 2.0)}
    assert shares == {1: 100.0, 2: 0.0, 4: 0.0}  # reused pid: no share; new: none yet
    assert with_cpu_share(before, now, 0.0) == now


def test_history_fills_cpu_shares() -> None:
    history = NodeHistory()
    for taken, cpu_time in ((10.0, 1.0), (12.0, 2.0), (14.0, 2.5), (16, 2.5)):
        snap = NodeSnapshot("n", taken, processes=[Process(1, "x", cpu_time, 1)])
        history.update(snap)
        if taken == 14.0:
            assert snap.processes[0].cpu == 25.0  # 0.5 s of CPU in 2 s
    assert snap.processes[0].cpu == 0.0


def test_orders_and_texts() -> None:
    procs = [Process(1, "a", 0, 10, 1.0), Process(2, "b", 0, 30, 1.0), Process(3, "c", 0, 20, 9)]
    assert [p.pid for p in ordered(procs, "cpu")] == [3, 2, 1]
    assert [p.pid for p in ordered(procs, "memory")] == [2, 3, 1]
    assert etcd_role(5, 5, False) == "leader"
    assert etcd_role(5, 6, False) == "follower"
    assert etcd_role(5, 6, True) == "learner"
    assert etcd_role(5, 0, False) == "no leader"
    assert boot_text({"slot": "B", "onTrial": True, "triesLeft": 2}) == (
        "B",
        "on trial, 2 tries left",
    )
    assert boot_text({"slot": "A", "fellBackFrom": "B", "reason": "gates"})[1] == (
        "fell back from B: gates"
    )
    assert update_text({"state": "available", "channel": "stable", "available": "0.3.0"}) == (
        "available, channel stable, available 0.3.0"
    )
    assert update_text({}) == "disabled"
    assert [duration(s) for s in (42, 90, 3725, 90061)] == ["42s", "1m30s", "1h02m", "1d01h"]
    degraded = FleetCluster("x", "ready", 1, 1, 0, "", nodes=2, linked=1)
    assert degraded.health == "degraded"


def test_bars_use_a_fixed_scale_newest_right() -> None:
    assert bars([5, 5, 5, 5], 6, 100) == ["      ", "  ▁▁▁▁"]  # 5 % is low, not full
    assert bars([0, 50, 100, 25], 4, 100) == ["  █ ", " ██▄"]
    assert bars(list(range(1, 21)), 5, 20, rows=1) == ["▂▃▅▆█"]  # 4 per column: their max
    assert bars([150], 1, 100, rows=1) == ["█"]  # clipped at the top
    assert bars([1.0], 3, 0.0, rows=1) == ["   "]  # no scale known yet: nothing drawn


# -- the verb's refusals (before any UI starts) ------------------------------------------


def test_dashboard_refuses_bad_input_with_a_hint(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from basalt.cli.main import main

    config = tmp_path / "config"
    assert main(["--basaltconfig", str(config), "dashboard", "--interval", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "--interval 0.1" in err and "hint:" in err
    assert main(["--basaltconfig", str(config), "dashboard", "--fleet", "login"]) == 1
    assert "not logged in to a fleet" in capsys.readouterr().err
    config.write_text(
        "fleet: {url: 'https://127.0.0.1:18443', token: t0ken, ca: 'not read here'}\n"
    )
    argv = ["--basaltconfig", str(config), "dashboard", "--fleet"]
    assert main([*argv, "https://127.0.0.2:18443"]) == 1
    err = capsys.readouterr().err
    assert "the stored login is for https://127.0.0.1:18443" in err and "t0ken" not in err
    assert main([*argv, "prod"]) == 1
    assert "neither a fleet URL nor 'login'" in capsys.readouterr().err
    # Under pytest stdin/stdout are no terminal: refused once the input is checked.
    assert main([*argv, "https://127.0.0.1:18443/"]) == 1
    assert "needs a terminal" in capsys.readouterr().err


def test_basaltctl_start_up_does_not_import_textual() -> None:
    import subprocess

    code = (
        "import sys; from basalt.cli.main import build_app, invoked_verb; "
        "build_app(invoked_verb(['version'])); build_app(invoked_verb(['dashboard'])); "
        "print('textual' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
