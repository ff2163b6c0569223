"""SystemStats/history: the node's CPU, memory and network use over the last hour, from
its own ``/proc``, one sample every ``--stats-interval`` seconds (30 by default).

One loop on the event loop, no thread: a sample is three small reads of ``/proc``. A read
that fails skips that sample (and logs it once until reads work again); nothing here
may stop the node. In container mode the figures are the host's, as its kernel is.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from basalt.machinery.resources import SystemStatsSpec

from ..runtime import Controller, ResourceStore
from ..sys.procstat import (
    CpuTimes,
    NetCounters,
    cpu_percent,
    read_cpu_times,
    read_memory,
    read_net_counters,
)

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)

RESOURCE = "SystemStats"
RESOURCE_ID = "history"
#: How far back the history reaches, in seconds.
WINDOW = 3600.0


@dataclass(frozen=True)
class Sample:
    time: float
    cpu: float
    memory: int
    #: Bytes per second received and sent (all interfaces but loopback).
    rx: float = 0.0
    tx: float = 0.0


class StatsRing:
    """The last ``window`` seconds of samples taken every ``interval`` seconds: a ring
    that forgets the oldest sample as a new one arrives; and the memory's size."""

    def __init__(self, interval: float, window: float = WINDOW) -> None:
        if interval <= 0:
            raise ValueError(f"the sampling interval must be positive, not {interval}")
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=max(1, math.ceil(window / interval)))
        self.memory_total = 0

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def spec(self) -> SystemStatsSpec:
        return SystemStatsSpec(
            interval=self.interval,
            cpu=[s.cpu for s in self.samples],
            memory=[s.memory for s in self.samples],
            memory_total=self.memory_total,
            times=[s.time for s in self.samples],
            network_rx=[s.rx for s in self.samples],
            network_tx=[s.tx for s in self.samples],
        )


class Sampler:
    """Reads one sample from ``proc``: CPU use and network rates since the previous
    reading, memory now.

    The first reading (and the first after a failed one) only sets the CPU baseline. The
    network counters are optional: without ``/proc/net/dev`` the rates are 0 (logged once).
    """

    def __init__(self, proc: Path, clock: Callable[[], float] = time.time) -> None:
        self.proc = proc
        self.clock = clock
        self._cpu: CpuTimes | None = None
        self._net: tuple[float, NetCounters] | None = None
        self.failing = False
        self.net_failing = False

    def read(self, ring: StatsRing) -> bool:
        """Add a sample to ``ring``; False when there is none this time."""
        try:
            cpu = read_cpu_times(self.proc)
            memory = read_memory(self.proc)
        except (OSError, ValueError) as exc:
            self._cpu = None
            if not self.failing:
                log.warning("system stats: cannot read %s, skipping samples: %s", self.proc, exc)
            self.failing = True
            return False
        if self.failing:
            log.info("system stats: %s readable again", self.proc)
        self.failing = False
        before, self._cpu = self._cpu, cpu
        busy = None if before is None else cpu_percent(before, cpu)
        ring.memory_total = memory.total
        now = self.clock()
        rx, tx = self._network(now)
        if busy is None:
            return False
        ring.add(Sample(round(now, 3), round(busy, 1), memory.used, rx, tx))
        return True

    def _network(self, now: float) -> tuple[float, float]:
        """Bytes per second received and sent since the previous reading (0, 0 on the
        first one, when the counters cannot be read, or when they went backwards)."""
        try:
            counters = read_net_counters(self.proc)
        except (OSError, ValueError) as exc:
            if not self.net_failing:
                log.warning("system stats: no network counters in %s: %s", self.proc, exc)
            self.net_failing, self._net = True, None
            return 0.0, 0.0
        self.net_failing = False
        before, self._net = self._net, (now, counters)
        if before is None or now <= before[0]:
            return 0.0, 0.0
        elapsed = now - before[0]
        return (
            round(max(0, counters.rx - before[1].rx) / elapsed, 1),
            round(max(0, counters.tx - before[1].tx) / elapsed, 1),
        )


class SystemStatsController(Controller):
    name = "system-stats"
    outputs = (RESOURCE,)

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ring = StatsRing(node.tuning.stats_interval)
        self.sampler = Sampler(node.platform.system_root / "proc")
        self._loop: asyncio.Task[None] | None = None

    async def reconcile(self, store: ResourceStore) -> None:
        if self._loop is None:
            self._loop = self.node.background(self._sample_forever(store), name="system-stats")

    def sample(self, store: ResourceStore) -> None:
        """One sample into the ring, and the ring into the store."""
        self.sampler.read(self.ring)
        store.put(RESOURCE, RESOURCE_ID, self.ring.spec(), owner=self.name)

    async def _sample_forever(self, store: ResourceStore) -> None:
        while True:
            try:
                self.sample(store)
            except Exception as exc:  # a bug here must cost samples, never the node
                log.warning("system stats: sample failed: %s", exc)
            await asyncio.sleep(self.ring.interval)
