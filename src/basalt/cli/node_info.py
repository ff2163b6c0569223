"""Looks at a node without a shell: ``stats``, ``cgroups``, ``time`` and ``usage``.

All four are read-only. ``stats`` and ``cgroups`` read the kernel's cgroup files on the
node; ``time`` asks SNTP servers from the node (its clock is never moved); ``usage``
walks a tree on the node like ``du --apparent-size``, under the path rules of ``ls``.
"""

from __future__ import annotations

import math
import posixpath
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run, table
from ._common import info, warn

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client

#: The containerd namespace of the kubelet's containers (CRI).
KUBERNETES_NAMESPACE = "k8s.io"

KubernetesOption = Annotated[
    bool,
    typer.Option(
        "-k", "--kubernetes", help=f"Only Kubernetes' containers ({KUBERNETES_NAMESPACE})."
    ),
]
NamespaceOption = Annotated[
    str, typer.Option("--namespace", help="Only this containerd namespace (default: every one).")
]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_HINT = "write a size like 4096, 10K, 1.5M or 2G (negative: only entries smaller than it)"


def container_namespace(kubernetes: bool, namespace: str) -> str:
    """The namespace -k/--namespace select ("" for every one); both at once is an error."""
    from basalt.machinery.errors import BasaltError

    if kubernetes and namespace and namespace != KUBERNETES_NAMESPACE:
        raise BasaltError(
            f"-k/--kubernetes means namespace {KUBERNETES_NAMESPACE}; --namespace {namespace} "
            "contradicts it",
            hint="give one of them",
        )
    return KUBERNETES_NAMESPACE if kubernetes else namespace


def human_bytes(size: float) -> str:
    """``123456789`` -> ``117.7MiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    """CPU time: ``0.25s``, ``12.3s``, ``4m05s``, ``2h03m``."""
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def parse_size(text: str) -> int:
    """``10M``, ``1.5G``, ``-100K``, ``4096``, ``2KiB``, ``3MB`` -> bytes (powers of 1024).

    Raises BasaltError naming the text when it is not a size.
    """
    from basalt.machinery.errors import BasaltError

    raw = text.strip()
    sign = -1 if raw.startswith("-") else 1
    body = (raw[1:] if raw[:1] in ("+", "-") else raw).upper()
    body = body.removesuffix("IB").removesuffix("B")
    number = body.rstrip("KMGTP")
    unit = body[len(number) :]
    try:
        value = float(number) if len(unit) <= 1 and number else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BasaltError(f"--threshold {text!r} is not a size", hint=_SIZE_HINT)
    return sign * int(value * _UNITS[unit])


# -- stats -----------------------------------------------------------------------------------


def stats(
    ctx: typer.Context,
    kubernetes: KubernetesOption = False,
    namespace: NamespaceOption = "",
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            min=0.0,
            max=60.0,
            help="Sample twice this many seconds apart and show CPU use as a percentage.",
        ),
    ] = 0.0,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Per-container memory and CPU on nodes (from each task's cgroup), biggest first."""
    import asyncio

    from basalt.machinery.api import machine_pb2

    request = machine_pb2.StatsRequest(namespace=container_namespace(kubernetes, namespace))

    async def work(client: Client, failures: NodeFailures) -> None:
        first = await client.machine.Stats(request, metadata=client.metadata(), timeout=30)
        before: dict[tuple[str, str, str], int] = {}
        answer = first
        if interval:
            before = {
                (item.metadata.node, s.namespace, s.id): s.cpu_usage_ns
                for item in first.messages
                for s in item.stats
            }
            await asyncio.sleep(interval)
            answer = await client.machine.Stats(request, metadata=client.metadata(), timeout=30)
        rows = []
        for item in failures.keep(answer.messages):
            node = item.metadata.node
            for s in item.stats:
                row: list[object] = [
                    node,
                    s.namespace,
                    s.pod or "-",
                    s.name or s.id,
                    human_bytes(s.memory_usage),
                    human_seconds(s.cpu_usage_ns / 1e9),
                    s.pids,
                ]
                if interval:
                    start = before.get((node, s.namespace, s.id))
                    used = s.cpu_usage_ns - start if start is not None else None
                    row.append("-" if used is None else f"{100 * used / (interval * 1e9):.1f}%")
                rows.append(row)
        columns = ["NODE", "NAMESPACE", "POD", "CONTAINER", "MEMORY", "CPU TIME", "PIDS"]
        table([*columns, "CPU %"] if interval else columns, rows)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


# -- cgroups ---------------------------------------------------------------------------------

#: Value key -> (column, kind): kinds "bytes", "usec" and "" (shown as the kernel wrote it).
CGROUP_COLUMNS: dict[str, tuple[str, str]] = {
    "cpu.stat.usage_usec": ("CPU", "usec"),
    "cpu.stat.user_usec": ("USER", "usec"),
    "cpu.stat.system_usec": ("SYSTEM", "usec"),
    "cpu.weight": ("WEIGHT", ""),
    "cpu.max": ("CPU MAX", ""),
    "memory.current": ("MEMORY", "bytes"),
    "memory.peak": ("PEAK", "bytes"),
    "memory.max": ("MEM MAX", "bytes"),
    "memory.stat.anon": ("ANON", "bytes"),
    "memory.stat.file": ("FILE", "bytes"),
    "io.stat.rbytes": ("READ", "bytes"),
    "io.stat.wbytes": ("WRITTEN", "bytes"),
    "io.stat.rios": ("READS", ""),
    "io.stat.wios": ("WRITES", ""),
    "pids.current": ("PIDS", ""),
    "pids.max": ("PIDS MAX", ""),
}


def cgroup_cell(key: str, value: str | None) -> str:
    if value is None:
        return "-"
    kind = CGROUP_COLUMNS.get(key, ("", ""))[1]
    if not value.isdigit():
        return value
    if kind == "bytes":
        return human_bytes(int(value))
    if kind == "usec":
        return human_seconds(int(value) / 1e6)
    return value


def cgroup_rows(node: str, cgroups: Iterable[Any], keys: Sequence[str]) -> list[tuple[object, ...]]:
    """One row per cgroup, its name indented by depth under the first one shown."""
    rows: list[tuple[object, ...]] = []
    entries = list(cgroups)
    top = min((e.path.count("/") + bool(e.path) for e in entries), default=0)
    for entry in entries:
        depth = entry.path.count("/") + bool(entry.path) - top
        name = posixpath.basename(entry.path) or "/"
        shown = ("  " * depth + name) if depth else (entry.path or "/")
        values = dict(entry.values)
        rows.append((node, shown, *(cgroup_cell(k, values.get(k)) for k in keys)))
    return rows


def cgroups(
    ctx: typer.Context,
    preset: Annotated[str, typer.Option("--preset", help="cpu, memory, io, pids or all.")] = "all",
    path: Annotated[
        str,
        typer.Option(
            "--path", help="Only this cgroup and those under it (relative to the cgroup root)."
        ),
    ] = "",
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """cgroup v2 usage on nodes, one row per cgroup, by preset."""
    from basalt.machinery.api import machine_pb2

    request = machine_pb2.CgroupsRequest(preset=preset, path=path)

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.Cgroups(request, metadata=client.metadata(), timeout=60)
        kept = failures.keep(answer.messages)
        present = {k for item in kept for c in item.cgroups for k in c.values}
        keys = [k for k in CGROUP_COLUMNS if k in present]
        keys += sorted(present - set(keys))
        rows = [row for item in kept for row in cgroup_rows(item.metadata.node, item.cgroups, keys)]
        headers = [CGROUP_COLUMNS.get(k, (k.upper(), ""))[0] for k in keys]
        table(["NODE", "CGROUP", *headers], rows)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


# -- time ------------------------------------------------------------------------------------


def time(
    ctx: typer.Context,
    check: Annotated[
        str,
        typer.Option(
            "--check",
            metavar="SERVER",
            help="Ask this SNTP server (HOST or HOST:PORT, resolved on the node) instead of "
            "the node's configured ones.",
        ),
    ] = "",
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """The nodes' clock offset against their time servers (or --check SERVER).

    Exits 1 when every server failed to answer a node. A node with no time servers
    configured (no TimeSyncConfig) shows its clock alone.
    """
    import datetime as dt

    from basalt.machinery.api import machine_pb2

    request = machine_pb2.TimeCheckRequest(server=check.strip())
    silent: list[str] = []

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.TimeCheck(request, metadata=client.metadata(), timeout=30)
        rows: list[tuple[object, ...]] = []
        for item in failures.keep(answer.messages):
            node = item.metadata.node
            when = dt.datetime.fromtimestamp(item.node_time, dt.UTC).strftime("%H:%M:%S.%f")[:-3]
            for s in item.samples:
                if s.error:
                    rows.append((node, when, s.server, "-", "-", "-", s.error))
                else:
                    rows.append(
                        (
                            node,
                            when,
                            s.server,
                            f"{s.offset_seconds * 1000:+.3f}ms",
                            f"{s.round_trip_seconds * 1000:.3f}ms",
                            s.stratum,
                            "",
                        )
                    )
            if not item.samples:
                rows.append((node, when, "-", "-", "-", "-", "no time servers configured"))
            elif all(s.error for s in item.samples):
                silent.append(node)
            info(f"{node}: clock {'in sync' if item.synced else 'not in sync'} (time sync)")
        table(
            ("NODE", "NODE TIME (UTC)", "SERVER", "OFFSET", "ROUND TRIP", "STRATUM", "ERROR"), rows
        )

    run(ctx, work, nodes=nodes, endpoints=endpoints)
    if silent:
        warn(f"no time server answered {', '.join(silent)}")
        raise typer.Exit(1)


# -- usage -----------------------------------------------------------------------------------


def usage(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="Directories or files on the node.")],
    depth: Annotated[
        int,
        typer.Option(
            "-d", "--depth", min=-1, help="Levels below each path to show (-1: every level)."
        ),
    ] = 0,
    threshold: Annotated[
        str,
        typer.Option(
            "-t",
            "--threshold",
            help="Leave out entries smaller than SIZE (10M, 1G); negative (-10M): show only "
            "entries smaller than it.",
        ),
    ] = "0",
    all_: Annotated[
        bool, typer.Option("-a", "--all", help="Show files, not only directories.")
    ] = False,
    in_bytes: Annotated[bool, typer.Option("--bytes", help="Sizes in bytes.")] = False,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Disk usage under paths on nodes, like du --apparent-size (read-only).

    Symlinks are not followed, hard-linked files count once, /proc and /sys and other
    kernel filesystems are not entered.
    """
    from basalt.machinery.api import machine_pb2

    request = machine_pb2.DiskUsageRequest(
        paths=paths, recursion_depth=depth, threshold=parse_size(threshold), all=all_
    )

    async def work(client: Client, failures: NodeFailures) -> None:
        many = len(client.nodes) > 1
        stream = client.machine.DiskUsage(request, metadata=client.metadata())
        async for entry in stream:
            node = entry.metadata.node
            if entry.metadata.error:
                failures.report(node, entry.metadata.error, entry.metadata.code)
                continue
            if entry.error:
                warn(f"{node}: {entry.name}: {entry.error}")
            size = str(entry.size) if in_bytes else human_bytes(entry.size)
            sys.stdout.write(f"{node + '  ' if many else ''}{size:>10}  {entry.name}\n")
        sys.stdout.flush()

    run(ctx, work, nodes=nodes, endpoints=endpoints)
