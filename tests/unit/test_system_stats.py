"""SystemStats/history: /proc parsing (checked against psutil on this machine), the ring,
the sampler over a fake /proc that can break, the controller in a node, and the fleet's
accessor."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from basalt.fleet.operations import Nodes
from basalt.machined.api.resources import to_proto
from basalt.machined.assemble import build_node
from basalt.machined.controllers.system_stats import (
    RESOURCE,
    RESOURCE_ID,
    Sample,
    Sampler,
    StatsRing,
    SystemStatsController,
)
from basalt.machined.main import parse_args
from basalt.machined.node import Node, Tuning
from basalt.machined.platform import NodePaths, Platform, PlatformMode
from basalt.machined.runtime import ResourceStore
from basalt.machined.sys.procstat import (
    CpuTimes,
    NetCounters,
    cpu_percent,
    parse_cpu_times,
    parse_meminfo,
    parse_net_dev,
    read_cpu_times,
    read_memory,
)
from basalt.machinery.api import resource_pb2
from basalt.machinery.resources import SystemStatsSpec, resolve_type
from basalt.machinery.roles import Role

GIB = 1024**3


class FakeProc:
    """A /proc with the two files the sampler reads, advanced like a kernel's counters;
    ``break_()`` removes /proc/stat (a read that fails) until ``mend()``."""

    def __init__(self, root: Path, total_kib: int = 4 * 1024 * 1024) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.total_kib = total_kib
        self.busy = 1000
        self.idle = 9000
        self.broken = False
        self.set_memory(available_kib=total_kib // 2)
        self.write_stat()

    def run(self, busy: int, idle: int) -> None:
        """``busy`` and ``idle`` more clock ticks on all CPUs."""
        self.busy += busy
        self.idle += idle
        self.write_stat()

    def write_stat(self) -> None:
        if self.broken:
            return
        # user nice system idle iowait irq softirq steal guest guest_nice; iowait is idle.
        user, system = self.busy // 2, self.busy - self.busy // 2
        idle, iowait = self.idle - 10, 10
        (self.root / "stat").write_text(
            f"cpu  {user} 0 {system} {idle} {iowait} 0 0 0 0 0\n"
            f"cpu0 {user} 0 {system} {idle} {iowait} 0 0 0 0 0\n"
            "intr 12345 0 0\nctxt 999\nbtime 1700000000\n"
        )

    def set_memory(self, available_kib: int) -> None:
        (self.root / "meminfo").write_text(
            f"MemTotal:       {self.total_kib} kB\n"
            f"MemFree:        {available_kib // 2} kB\n"
            f"MemAvailable:   {available_kib} kB\n"
            "Buffers:           1024 kB\n"
        )

    def break_(self) -> None:
        self.broken = True
        (self.root / "stat").unlink()

    def mend(self) -> None:
        self.broken = False
        self.write_stat()


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- /proc ----------------------------------------------------------------------------


def test_cpu_times_take_idle_and_iowait_as_idle_and_leave_guest_out() -> None:
    text = "cpu  100 20 30 400 50 6 7 8 90 10\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
    assert parse_cpu_times(text) == CpuTimes(total=100 + 20 + 30 + 400 + 50 + 6 + 7 + 8, idle=450)


@pytest.mark.parametrize(
    ("before", "after", "percent"),
    [
        (CpuTimes(1000, 800), CpuTimes(1100, 850), 50.0),
        (CpuTimes(1000, 800), CpuTimes(1200, 1000), 0.0),
        (CpuTimes(1000, 800), CpuTimes(1400, 800), 100.0),
        (CpuTimes(1000, 800), CpuTimes(1000, 800), None),  # no time passed
        (CpuTimes(1000, 800), CpuTimes(900, 700), None),  # counters went back
        (CpuTimes(1000, 800), CpuTimes(1100, 790), None),  # idle went back
    ],
)
def test_cpu_percent_between_two_readings(
    before: CpuTimes, after: CpuTimes, percent: float | None
) -> None:
    assert cpu_percent(before, after) == percent


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("intr 1 2\n", "cpu"),
        ("cpu  1 2\n", "cpu"),
        ("cpu  1 2 x 4\n", "invalid literal"),
    ],
)
def test_a_stat_file_without_a_usable_cpu_line_is_refused(text: str, missing: str) -> None:
    with pytest.raises(ValueError, match=missing):
        parse_cpu_times(text)


def test_meminfo_without_available_memory_is_refused() -> None:
    with pytest.raises(ValueError, match="MemAvailable"):
        parse_meminfo("MemTotal: 1024 kB\nMemFree: 512 kB\n")


NET_DEV = "".join(
    line + "\n"
    for line in (
        "Inter-|   Receive          |  Transmit",
        " face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs ...",
        "    lo: 9000000 100 0 0 0 0 0 0  9000000 100 0 0 0 0 0 0",
        "  eth0:    1500  10 0 0 0 0 0 0      700   7 0 0 0 0 0 0",
        "  eth1:     500   5 0 0 0 0 0 0      300   3 0 0 0 0 0 0",
    )
)


def test_net_dev_sums_every_interface_but_loopback() -> None:
    assert parse_net_dev(NET_DEV) == NetCounters(rx=2000, tx=1000)
    with pytest.raises(ValueError, match="no interface"):
        parse_net_dev(NET_DEV.splitlines(keepends=True)[0])
    with pytest.raises(ValueError, match="short line"):
        parse_net_dev("  eth0: 1 2 3\n")


def test_the_sampler_turns_network_counters_into_rates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc = FakeProc(tmp_path / "proc")
    clock = FakeClock()
    sampler = Sampler(proc.root, clock)
    ring = StatsRing(30.0)
    assert sampler.read(ring) is False
    proc.run(busy=10, idle=10)
    clock.now += 30
    assert sampler.read(ring) is True  # no /proc/net/dev: rates are 0, the sample is kept
    assert ring.spec().network_rx == [0.0]
    assert sum("no network counters" in r.message for r in caplog.records) == 1

    net = proc.root / "net"
    net.mkdir()
    (net / "dev").write_text(NET_DEV)
    proc.run(busy=10, idle=10)
    clock.now += 30
    sampler.read(ring)  # the first counters: the rates' baseline
    (net / "dev").write_text(NET_DEV.replace("1500", "31500").replace(" 700 ", " 3700 "))
    proc.run(busy=10, idle=10)
    clock.now += 30
    sampler.read(ring)
    spec = ring.spec()
    assert spec.network_rx == [0.0, 0.0, 1000.0] and spec.network_tx == [0.0, 0.0, 100.0]
    assert len(spec.network_rx) == len(spec.times) == len(spec.cpu)

    (net / "dev").write_text(NET_DEV)  # counters went back (an interface went away)
    proc.run(busy=10, idle=10)
    clock.now += 30
    sampler.read(ring)
    assert ring.spec().network_rx[-1] == 0.0


def test_the_real_proc_agrees_with_psutil() -> None:
    memory = read_memory()
    oracle = psutil.virtual_memory()
    assert memory.total == oracle.total
    assert abs(memory.used - (oracle.total - oracle.available)) < 0.02 * oracle.total
    times = read_cpu_times()
    ticks = psutil.cpu_times()
    hertz = os.sysconf("SC_CLK_TCK")  # psutil gives seconds; /proc/stat, clock ticks
    assert times.idle / hertz == pytest.approx(ticks.idle + ticks.iowait, rel=0.01)


# -- the ring and the sampler -----------------------------------------------------------


def test_the_ring_keeps_an_hour_oldest_first() -> None:
    ring = StatsRing(30.0)
    assert ring.samples.maxlen == 120
    for i in range(130):
        ring.add(Sample(time=1000.0 + 30 * i, cpu=float(i % 100), memory=i))
    ring.memory_total = 8 * GIB
    spec = ring.spec()
    assert len(spec.times) == len(spec.cpu) == len(spec.memory) == 120
    assert spec.times[0] == 1000.0 + 30 * 10 and spec.times[-1] == 1000.0 + 30 * 129
    assert spec.memory == list(range(10, 130))
    wire = json.loads(spec.to_json())
    assert list(wire) == [
        *("interval", "cpu", "memory", "memoryTotal", "times"),
        *("networkRx", "networkTx"),
    ]
    assert wire["interval"] == 30.0 and wire["memoryTotal"] == 8 * GIB


@pytest.mark.parametrize(("interval", "maxlen"), [(0.5, 7200), (7.0, 515), (5000.0, 1)])
def test_the_ring_is_sized_for_the_window(interval: float, maxlen: int) -> None:
    assert StatsRing(interval).samples.maxlen == maxlen


def test_the_ring_refuses_a_useless_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        StatsRing(0.0)


def test_the_sampler_measures_between_readings(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    clock = FakeClock()
    sampler = Sampler(proc.root, clock)
    ring = StatsRing(30.0)
    assert sampler.read(ring) is False  # the first reading is the baseline only
    assert ring.memory_total == 4 * GIB and not ring.samples

    proc.run(busy=300, idle=100)
    proc.set_memory(available_kib=1024 * 1024)
    clock.now += 30
    assert sampler.read(ring) is True
    assert list(ring.samples) == [Sample(time=clock.now, cpu=75.0, memory=3 * GIB)]

    proc.run(busy=0, idle=400)
    clock.now += 30
    assert sampler.read(ring) is True
    assert ring.spec().cpu == [75.0, 0.0]


def test_a_failed_read_skips_a_sample_and_the_next_good_one_starts_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc = FakeProc(tmp_path / "proc")
    sampler = Sampler(proc.root, FakeClock())
    ring = StatsRing(30.0)
    sampler.read(ring)
    proc.run(busy=50, idle=50)
    assert sampler.read(ring) is True

    proc.break_()
    assert sampler.read(ring) is False
    assert sampler.read(ring) is False
    assert len(ring.samples) == 1
    assert sum("cannot read" in r.message for r in caplog.records) == 1  # once, not per sample

    (proc.root / "meminfo").write_text("garbage\n")
    proc.mend()
    assert sampler.read(ring) is False  # a file that is not the kernel's: skipped too
    proc.set_memory(available_kib=proc.total_kib)
    assert sampler.read(ring) is False  # readable again: a new baseline, no sample yet
    proc.run(busy=10, idle=30)
    assert sampler.read(ring) is True
    assert ring.spec().cpu == [50.0, 25.0]


# -- the controller -----------------------------------------------------------------------


def _node(tmp_path: Path, interval: float) -> tuple[Node, FakeProc]:
    system_root = tmp_path / "machine"
    proc = FakeProc(system_root / "proc")
    platform = Platform(
        PlatformMode.CONTAINER,
        NodePaths.under(tmp_path / "node"),
        "127.0.0.9",
        "n1",
        system_root=system_root,
    )
    return build_node(platform, Tuning(stats_interval=interval)), proc


async def _ticking(proc: FakeProc) -> None:
    """The kernel's counters move on, a little busy, mostly idle."""
    while True:
        proc.run(busy=1, idle=3)
        await asyncio.sleep(0.01)


async def _samples(store: ResourceStore, at_least: int, timeout: float = 5.0) -> SystemStatsSpec:
    async def enough() -> SystemStatsSpec:
        while True:
            resource = store.get(RESOURCE, RESOURCE_ID)
            if resource is not None:
                spec = resource.spec
                assert isinstance(spec, SystemStatsSpec)
                if len(spec.cpu) >= at_least:
                    return spec
            await asyncio.sleep(0.01)

    return await asyncio.wait_for(enough(), timeout)


def test_the_controller_publishes_the_history_and_outlives_broken_reads(tmp_path: Path) -> None:
    async def run() -> None:
        node, proc = _node(tmp_path, 0.05)
        node.background(_ticking(proc), name="kernel")
        controller = SystemStatsController(node)
        await controller.reconcile(node.store)
        loop = controller._loop
        await controller.reconcile(node.store)  # kicked again (a config arrived): one loop
        assert controller._loop is loop
        await asyncio.sleep(0)
        first = node.store.get(RESOURCE, RESOURCE_ID)
        assert first is not None and first.spec.memory_total == 4 * GIB  # before any sample
        assert first.meta.namespace == "perf"
        spec = await _samples(node.store, 2)
        assert spec.interval == 0.05 and spec.times == sorted(spec.times)
        assert all(cpu == 25.0 for cpu in spec.cpu) and set(spec.memory) == {2 * GIB}

        proc.break_()
        await asyncio.sleep(0.1)
        stuck = len(node.store.get(RESOURCE, RESOURCE_ID).spec.cpu)  # type: ignore[union-attr]
        await asyncio.sleep(0.2)
        assert len(node.store.get(RESOURCE, RESOURCE_ID).spec.cpu) == stuck  # type: ignore[union-attr]
        assert controller._loop is not None and not controller._loop.done()
        proc.mend()
        await _samples(node.store, stuck + 2)
        await node.stop_background()

    asyncio.run(run())


def test_the_engine_starts_the_sampler_on_every_node(tmp_path: Path) -> None:
    async def run() -> None:
        node, proc = _node(tmp_path, 0.05)
        node.background(_ticking(proc), name="kernel")
        node.wiring.start_controllers()
        try:
            await _samples(node.store, 1)
        finally:
            await node.stop_background()
            assert node.engine is not None
            await node.engine.stop()

    asyncio.run(run())


def test_machined_samples_every_30_seconds_unless_told() -> None:
    base = ["--node-dir", "/tmp/n", "--address", "127.0.0.9", "--hostname", "n1"]
    assert parse_args(base).stats_interval == 30.0
    assert parse_args([*base, "--stats-interval", "0.5"]).stats_interval == 0.5
    for bad in ("0.01", "0", "-1", "nan"):
        with pytest.raises(SystemExit):
            parse_args([*base, "--stats-interval", bad])


def test_readers_may_read_it() -> None:
    definition = resolve_type("stats")
    assert definition.type == "SystemStats" and not definition.sensitive
    assert resolve_type("systemstats") is definition


# -- the fleet's accessor -----------------------------------------------------------------


class _Resources:
    def __init__(self, store: ResourceStore) -> None:
        self.store = store
        self.asked: list[resource_pb2.ResourceGetRequest] = []

    async def Get(
        self, request: resource_pb2.ResourceGetRequest, timeout: float
    ) -> resource_pb2.ResourceGetResponse:
        self.asked.append(request)
        resource = self.store.get(request.type, request.id)
        assert resource is not None
        return resource_pb2.ResourceGetResponse(
            messages=[resource_pb2.ResourceGet(resource=to_proto(resource))]
        )


class _LinkedNodes(Nodes):
    """The fleet's Nodes with its link replaced by one node's store (what the node's
    ResourceService would answer); records the role each call asked for."""

    def __init__(self, store: ResourceStore) -> None:
        self.resources = _Resources(store)
        self.roles: list[Role] = []

    @asynccontextmanager
    async def client(  # type: ignore[override]
        self, uuid: str, cluster: str | None, wait: float = 0.0, role: Role = Role.ADMIN
    ) -> AsyncIterator[Any]:
        self.roles.append(role)
        yield self


def test_the_fleet_reads_the_history_as_a_reader() -> None:
    store = ResourceStore()
    ring = StatsRing(30.0)
    ring.add(Sample(time=1000.0, cpu=12.5, memory=GIB))
    ring.memory_total = 2 * GIB
    store.put(RESOURCE, RESOURCE_ID, ring.spec(), owner="system-stats")
    nodes = _LinkedNodes(store)

    stats = asyncio.run(nodes.stats("uuid-1", "prod"))
    assert stats == {
        "interval": 30.0,
        "cpu": [12.5],
        "memory": [GIB],
        "memoryTotal": 2 * GIB,
        "times": [1000.0],
        "networkRx": [0.0],
        "networkTx": [0.0],
    }
    assert nodes.roles == [Role.READER]
    assert [(r.type, r.id) for r in nodes.resources.asked] == [("SystemStats", "history")]
