"""The machine's CPU time and memory, from ``/proc/stat`` and ``/proc/meminfo``.

Read directly rather than through psutil (which reads the same two files): this runs
from the first boot on, before the maintenance API opens, where every import costs.
Parsers take the file's text, so they are tested without a kernel; readers raise
OSError or ValueError when a file is missing or not what the kernel writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PROC",
    "CpuTimes",
    "Memory",
    "cpu_percent",
    "parse_cpu_times",
    "parse_meminfo",
    "read_cpu_times",
    "read_memory",
]

PROC = Path("/proc")


@dataclass(frozen=True)
class CpuTimes:
    """All CPUs' time since boot, in clock ticks: in all, and idle (idle + iowait)."""

    total: int
    idle: int


@dataclass(frozen=True)
class Memory:
    """Bytes: the machine's memory, and how much of it is in use (total - available)."""

    total: int
    used: int


def parse_cpu_times(text: str) -> CpuTimes:
    """The aggregate ``cpu`` line of ``/proc/stat``.

    Its columns are user nice system idle iowait irq softirq steal guest guest_nice;
    guest time is already counted in user and nice, so the total stops at steal.
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(v) for v in fields[1:9]]
            if len(ticks) < 4:
                break
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            return CpuTimes(total=sum(ticks), idle=idle)
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def cpu_percent(before: CpuTimes, after: CpuTimes) -> float | None:
    """Percent of all CPUs busy between two readings; None when no time passed between
    them (or the counters went backwards), as there is nothing to divide by."""
    total = after.total - before.total
    idle = after.idle - before.idle
    if total <= 0 or idle < 0:
        return None
    return min(100.0, max(0.0, 100.0 * (total - idle) / total))


def parse_meminfo(text: str) -> Memory:
    """MemTotal and MemAvailable of ``/proc/meminfo`` (kB there), as bytes."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        amount = rest.split()
        if key in ("MemTotal", "MemAvailable") and amount:
            values[key] = int(amount[0]) * 1024
    missing = [k for k in ("MemTotal", "MemAvailable") if k not in values]
    if missing:
        raise ValueError(f"/proc/meminfo has no {', '.join(missing)}")
    total = values["MemTotal"]
    return Memory(total=total, used=max(0, total - values["MemAvailable"]))


@dataclass(frozen=True)
class NetCounters:
    """Bytes received and sent since boot by every interface but loopback."""

    rx: int
    tx: int


def parse_net_dev(text: str) -> NetCounters:
    """The receive and transmit byte columns of ``/proc/net/dev``, summed over the
    interfaces other than ``lo`` (whose traffic never leaves the machine)."""
    rx = tx = 0
    seen = False
    for line in text.splitlines():
        name, colon, rest = line.partition(":")
        if not colon or "|" in line:
            continue  # the two header lines
        columns = rest.split()
        if len(columns) < 9:
            raise ValueError(f"/proc/net/dev: short line for {name.strip()!r}")
        seen = True
        if name.strip() != "lo":
            rx += int(columns[0])
            tx += int(columns[8])
    if not seen:
        raise ValueError("/proc/net/dev lists no interface")
    return NetCounters(rx=rx, tx=tx)


def read_net_counters(proc: Path = PROC) -> NetCounters:
    return parse_net_dev((proc / "net" / "dev").read_text())


def read_cpu_times(proc: Path = PROC) -> CpuTimes:
    return parse_cpu_times((proc / "stat").read_text())


def read_memory(proc: Path = PROC) -> Memory:
    return parse_meminfo((proc / "meminfo").read_text())
