"""Looking inside nodes: dmesg, events, ps, memory, mounts, netstat."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, list_verb, print_chunks, run, table

if TYPE_CHECKING:
    from basalt.machinery.api import machine_pb2
    from basalt.machinery.client.client import Client

FollowOption = Annotated[bool, typer.Option("-f", "--follow", help="Keep streaming new ones.")]

_MIB = 1024 * 1024
_GB = 1000**3
#: ``since_seconds`` that leaves out all history (0 would mean "no limit").
_NO_HISTORY = 1e-6


def dmesg(
    ctx: typer.Context,
    follow: FollowOption = False,
    tail: Annotated[
        bool, typer.Option("--tail", help="Skip what is in the buffer now (with -f: only new).")
    ] = False,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Print the kernel log of nodes."""
    from basalt.machinery.api import machine_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        request = machine_pb2.DmesgRequest(follow=follow, tail=tail)
        chunks = client.machine.Dmesg(request, metadata=client.metadata())
        await print_chunks(client, failures, chunks)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


def parse_since(text: str) -> tuple[str, float]:
    """``--since``: a duration (``90s``, ``5m``, ``1h30m``) or an event id -> (id, seconds)."""
    from basalt.machinery.durations import parse_duration
    from basalt.machinery.errors import BasaltError

    seconds = parse_duration(text)
    if seconds is not None:
        return "", max(seconds, _NO_HISTORY)  # the API reads 0 as "everything"
    if text.isascii() and text.isdigit():
        return text, 0.0
    raise BasaltError(
        f"--since {text!r} is neither a duration nor an event id",
        hint="give a duration such as 90s, 5m or 1h, or an ID from an earlier 'basaltctl events'",
    )


def _event_line(event: machine_pb2.Event) -> str:
    when = dt.datetime.fromtimestamp(event.timestamp).strftime("%Y-%m-%d %H:%M:%S")
    message = event.message
    if event.fields:
        message += " " + " ".join(f"{k}={v}" for k, v in sorted(event.fields.items()))
    return (
        f"{event.metadata.node:<15} {event.id:<10} {when} {event.type:<11} "
        f"{event.actor or '-':<14} {message}"
    )


def events(
    ctx: typer.Context,
    follow: FollowOption = False,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only events newer than a duration (5m) or an event ID."),
    ] = None,
    tail: Annotated[int, typer.Option("--tail", help="Only the last N events (-1: all).")] = -1,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Print what happened on nodes: boot phases, services, config changes."""
    from basalt.machinery.api import machine_pb2

    since_id, since_seconds = parse_since(since) if since else ("", 0.0)
    if tail == 0:  # the API reads a tail of 0 as "all": ask for no history instead
        since_seconds = _NO_HISTORY
    request = machine_pb2.EventsRequest(
        follow=follow,
        since_id=since_id,
        since_seconds=since_seconds,
        tail_events=max(tail, 0),
    )

    async def work(client: Client, failures: NodeFailures) -> None:
        header = f"{'NODE':<15} {'ID':<10} {'TIME':<19} {'TYPE':<11} {'ACTOR':<14} MESSAGE"
        print(header, flush=True)
        async for event in client.machine.Events(request, metadata=client.metadata()):
            if event.metadata.error:
                failures.report(event.metadata.node, event.metadata.error, event.metadata.code)
            else:
                print(_event_line(event), flush=True)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


def human_bytes(size: int) -> str:
    """``123456789`` -> ``117.7 MiB`` (binary units, as ``ps`` users read them)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def cpu_time(seconds: float) -> str:
    """CPU seconds as ``H:MM:SS.ss``."""
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:05.2f}"


def ps(ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None) -> None:
    """List the processes of nodes, largest resident memory first."""
    from basalt.machinery.api import common_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.Processes(
            common_pb2.Empty(), metadata=client.metadata(), timeout=30
        )
        found = [
            (item.metadata.node, process)
            for item in failures.keep(answer.messages)
            for process in item.processes
        ]
        found.sort(key=lambda pair: pair[1].resident_memory, reverse=True)
        table(
            ("NODE", "PID", "STATE", "THREADS", "CPU-TIME", "VIRTMEM", "RESMEM", "COMMAND"),
            (
                (
                    node,
                    p.pid,
                    p.state,
                    p.threads,
                    cpu_time(p.cpu_time),
                    human_bytes(p.virtual_memory),
                    human_bytes(p.resident_memory),
                    p.args or p.command,
                )
                for node, p in found
            ),
        )

    run(ctx, work, nodes=nodes, endpoints=endpoints)


def memory(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """Show nodes' memory in MiB, and how much the node agent itself uses."""

    def rows(m: Any) -> Iterator[tuple[object, ...]]:
        used = m.total - m.available  # what free(1) calls used
        values = (m.total, used, m.free, m.shared, m.buffers, m.cached, m.available)
        yield (m.metadata.node, *(v // _MIB for v in values), m.agent_rss // _MIB)

    columns = (
        "NODE",
        "TOTAL",
        "USED",
        "FREE",
        "SHARED",
        "BUFFERS",
        "CACHE",
        "AVAILABLE",
        "AGENT-RSS",
    )
    list_verb(ctx, "Memory", columns, rows, nodes=nodes, endpoints=endpoints)


def mounts(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """List nodes' mounted filesystems with their size and use (pseudo filesystems left out)."""

    def rows(item: Any) -> Iterator[tuple[object, ...]]:
        for mount in item.stats:
            if not mount.size:
                continue
            used = mount.size - mount.available
            yield (
                item.metadata.node,
                mount.filesystem,
                f"{mount.size / _GB:.2f}",
                f"{used / _GB:.2f}",
                f"{100 * used / mount.size:.1f}%",
                mount.mounted_on,
            )

    columns = ("NODE", "FILESYSTEM", "SIZE(GB)", "USED(GB)", "USED%", "MOUNTED ON")
    list_verb(ctx, "Mounts", columns, rows, nodes=nodes, endpoints=endpoints)


def _address(ip: str, port: int) -> str:
    import ipaddress

    if not ip:
        return "*:*"
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        host = ip
    else:
        mapped = getattr(parsed, "ipv4_mapped", None)  # show ::ffff:a.b.c.d as a.b.c.d
        host = str(mapped) if mapped else (f"[{ip}]" if parsed.version == 6 else ip)
    return f"{host}:{port or '*'}"


def netstat(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """List nodes' TCP and UDP sockets with the process that owns each."""
    from basalt.machinery.api import common_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.Netstat(
            common_pb2.Empty(), metadata=client.metadata(), timeout=15
        )
        rows = []
        for item in failures.keep(answer.messages):
            for c in item.connections:
                owner = f"{c.pid}/{c.process or '?'}" if c.pid else "-"
                rows.append(
                    (
                        item.metadata.node,
                        c.l4proto,
                        _address(c.local_ip, c.local_port),
                        _address(c.remote_ip, c.remote_port),
                        c.state,
                        owner,
                    )
                )
        table(("NODE", "PROTO", "LOCAL", "REMOTE", "STATE", "PID/PROGRAM"), rows)

    run(ctx, work, nodes=nodes, endpoints=endpoints)
