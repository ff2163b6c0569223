"""``basaltctl meta read|write|delete``: the operator's keys on a metal node's META
partition (admin only). Names Basalt owns are refused by the node, which says which."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, action_verb, run, table

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client

app = typer.Typer(
    help="Read and write the operator's keys on META (metal nodes installed to disk).",
    no_args_is_help=True,
)


@app.command("read")
def read(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Argument(help="One key (default: every key).")] = None,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Print the value of KEY, or every key with its value."""
    from basalt.machinery.api import machine_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.MetaRead(
            machine_pb2.MetaReadRequest(key=key or ""), metadata=client.metadata(), timeout=15
        )
        kept = failures.keep(answer.messages)
        if key and len(kept) == 1 and len(client.nodes) <= 1:
            for entry in kept[0].entries:
                print(entry.value)
            return
        rows = [
            (item.metadata.node or client.endpoint, entry.key, entry.value)
            for item in kept
            for entry in item.entries
        ]
        table(("NODE", "KEY", "VALUE"), rows)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


@app.command("write")
def write(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="The key: letters, digits, '.', '_', '-'.")],
    value: Annotated[str, typer.Argument(help="Its value (at most 8 KiB).")],
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Store KEY=VALUE on META (two checksummed copies; survives reboots and upgrades)."""
    from basalt.machinery.api import machine_pb2

    action_verb(
        ctx,
        "MetaWrite",
        machine_pb2.MetaWriteRequest(key=key, value=value),
        nodes=nodes,
        endpoints=endpoints,
    )


@app.command("delete")
def delete(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="The key to remove.")],
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Remove KEY from META."""
    from basalt.machinery.api import machine_pb2

    action_verb(
        ctx, "MetaDelete", machine_pb2.MetaDeleteRequest(key=key), nodes=nodes, endpoints=endpoints
    )
