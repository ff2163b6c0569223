"""SystemStats/history: the node's CPU and memory use over the last hour, from its own
``/proc``, one sample every ``--stats-interval`` seconds (30 by default).

One loop on the event loop, no thread: a sample is two small reads of ``/proc``. A read
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
from ..sys.procstat import CpuTimes, cpu_percent, read_cpu_times, read_memory

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
        )


class Sampler:
    """Reads one sample from ``proc``: CPU use since the previous reading, memory now.

    The first reading (and the first after a failed one) only sets the CPU baseline.
    """

    def __init__(self, proc: Path, clock: Callable[[], float] = time.time) -> None:
        self.proc = proc
        self.clock = clock
        self._cpu: CpuTimes | None = None
        self.failing = False

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
        if busy is None:
            return False
        ring.add(Sample(round(self.clock(), 3), round(busy, 1), memory.used))
        return True


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
