"""Service verbs: services, service NAME start|stop|restart|status, logs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, list_verb, print_chunks, run

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client


def services(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """List each node's services with state and health."""

    def rows(item: Any) -> Iterator[tuple[object, ...]]:
        for svc in item.services:
            state = svc.state.upper()
            yield (item.metadata.node, svc.id, state, svc.health, svc.restarts, svc.message)

    columns = ("NODE", "SERVICE", "STATE", "HEALTH", "RESTARTS", "MESSAGE")
    list_verb(ctx, "ServiceList", columns, rows, nodes=nodes, endpoints=endpoints)


class ServiceVerb(StrEnum):
    start = "start"
    stop = "stop"
    restart = "restart"
    status = "status"


def service(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Service id, e.g. kubelet.")],
    verb: Annotated[
        ServiceVerb, typer.Argument(help="start, stop, restart or status.")
    ] = ServiceVerb.status,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Start, stop or restart a service, or show its status and recent events."""
    from basalt.machinery.api import common_pb2, machine_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        if verb is not ServiceVerb.status:
            action = machine_pb2.ServiceActionKind.Value(verb.value.upper())
            answer = await client.machine.ServiceAction(
                machine_pb2.ServiceActionRequest(id=name, action=action),
                metadata=client.metadata(),
                timeout=30,
            )
            for item in failures.keep(answer.messages):
                print(f"{item.metadata.node}: {item.message}")
            return
        services = await client.machine.ServiceList(
            common_pb2.Empty(), metadata=client.metadata(), timeout=15
        )
        for listed in failures.keep(services.messages):
            found = [s for s in listed.services if s.id == name]
            if not found:
                failures.report(listed.metadata.node, f"no service {name!r}", 5)
                continue
            svc = found[0]
            print(
                f"NODE     {listed.metadata.node}\nID       {svc.id}\nSTATE    {svc.state.upper()}"
            )
            print(f"HEALTH   {svc.health}\nPID      {svc.pid or '-'}\nRESTARTS {svc.restarts}")
            print("EVENTS")
            for event in svc.events:
                when = dt.datetime.fromtimestamp(event.timestamp).strftime("%H:%M:%S")
                print(f"  {when} [{event.state}] {event.message}")

    run(ctx, work, nodes=nodes, endpoints=endpoints)


def logs(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Service id, or 'machined' for the agent itself.")],
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep streaming new lines.")
    ] = False,
    tail: Annotated[int, typer.Option("--tail", help="Lines from the end (-1: all).")] = -1,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Print a service's log (kept in a ring buffer on the node)."""
    from basalt.machinery.api import machine_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        request = machine_pb2.LogsRequest(id=name, follow=follow, tail_lines=tail)
        chunks = client.machine.Logs(request, metadata=client.metadata())
        await print_chunks(client, failures, chunks)

    run(ctx, work, nodes=nodes, endpoints=endpoints)
