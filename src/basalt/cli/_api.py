"""Talking to nodes from the CLI: target options, one client per command, per-node answers.

Every API verb takes ``-n/--nodes`` (targets) and ``-e/--endpoints`` (where to dial),
and ``--insecure`` where maintenance mode is meaningful. Answers come back per node;
a node that failed is reported on stderr and makes the command exit 1 after the
other nodes' answers are shown.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from ._common import options

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client

T = TypeVar("T")

NodesOption = Annotated[
    list[str] | None,
    typer.Option("-n", "--nodes", help="Target nodes (repeat or comma-list); default: context's."),
]
EndpointsOption = Annotated[
    list[str] | None,
    typer.Option("-e", "--endpoints", help="Endpoints to dial; default: the context's."),
]
InsecureOption = Annotated[
    bool,
    typer.Option(
        "-i", "--insecure", help="Maintenance mode: no client certificate; dial each node."
    ),
]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="Seconds to wait for answers.")]


def split(values: Sequence[str] | None) -> list[str]:
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


class NodeFailures:
    """Per-node errors seen in answers; the command exits 1 when there were any."""

    def __init__(self) -> None:
        self.count = 0

    def report(self, node: str, error: str, code: int = 0) -> None:
        import grpc

        name = next((c.name for c in grpc.StatusCode if c.value[0] == code), "ERROR")
        print(f"error: {node or '?'}: {name}: {error}", file=sys.stderr)
        self.count += 1

    def keep(self, messages: Iterable[T]) -> list[T]:
        """The messages that carry no per-node error (the others are reported)."""
        kept = []
        for message in messages:
            meta = message.metadata  # type: ignore[attr-defined]
            if meta.error:
                self.report(meta.node, meta.error, meta.code)
            else:
                kept.append(message)
        return kept


def run(
    ctx: typer.Context,
    work: Callable[[Client, NodeFailures], Awaitable[None]],
    *,
    nodes: Sequence[str] | None,
    endpoints: Sequence[str] | None,
    insecure: bool = False,
) -> None:
    """Connect as the context (or insecurely), run ``work``, map gRPC errors, set exit code."""
    import asyncio

    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    failures = NodeFailures()
    asyncio.run(_run(ctx, work, split(nodes), split(endpoints), insecure, failures))
    if failures.count:
        raise typer.Exit(1)


async def _run(
    ctx: typer.Context,
    work: Callable[[Client, NodeFailures], Awaitable[None]],
    nodes: list[str],
    endpoints: list[str],
    insecure: bool,
    failures: NodeFailures,
) -> None:
    import grpc.aio

    from basalt.machinery.client.client import Client, rpc_error
    from basalt.machinery.errors import BasaltError

    opts = options(ctx)
    if insecure:
        targets = nodes or endpoints
        if not targets:
            raise BasaltError("--insecure needs the node to talk to: -n NODE")
        for target in targets:
            client = await Client.connect(target, insecure=True)
            try:
                await work(client, failures)
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc, target) from None
            finally:
                await client.close()
        return
    _, context = opts.load_client_config().current(opts.context)
    client = await Client.from_context(context, endpoints=endpoints, nodes=nodes)
    try:
        await work(client, failures)
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, client.endpoint) from None
    finally:
        await client.close()


async def print_chunks(client: Client, failures: NodeFailures, chunks: AsyncIterable[Any]) -> None:
    """Write a streamed log (Logs, Dmesg) to stdout as it comes, each line's node first
    when there are several; a node's error is reported, the others go on."""
    many = len(client.nodes) > 1
    async for chunk in chunks:
        if chunk.metadata.error:
            failures.report(chunk.metadata.node, chunk.metadata.error, chunk.metadata.code)
            continue
        prefix = f"{chunk.metadata.node}: " if many else ""
        sys.stdout.write(prefix + chunk.bytes.decode(errors="replace"))
        sys.stdout.flush()


def list_verb(
    ctx: typer.Context,
    rpc: str,
    columns: Sequence[str],
    rows_of: Callable[[Any], Iterable[Sequence[Any]]],
    *,
    nodes: Sequence[str] | None,
    endpoints: Sequence[str] | None,
) -> None:
    """A listing verb: MachineService's ``rpc`` (an Empty request) on every node, and one
    table of the rows ``rows_of`` makes of each node's answer."""
    from basalt.machinery.api import common_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        call = getattr(client.machine, rpc)
        answer = await call(common_pb2.Empty(), metadata=client.metadata(), timeout=15)
        table(columns, [row for item in failures.keep(answer.messages) for row in rows_of(item)])

    run(ctx, work, nodes=nodes, endpoints=endpoints)


def action_verb(
    ctx: typer.Context,
    rpc: str,
    request: object,
    *,
    nodes: Sequence[str] | None,
    endpoints: Sequence[str] | None,
) -> None:
    """An action verb: MachineService's ``rpc`` (answering ActionResponse) on every node,
    and each node's message on a line of its own."""

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await getattr(client.machine, rpc)(request, metadata=client.metadata(), timeout=30)
        for item in failures.keep(answer.messages):
            print(f"{item.metadata.node or client.endpoint}: {item.message}")

    run(ctx, work, nodes=nodes, endpoints=endpoints)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A plain, aligned table on stdout (no box drawing, easy to grep)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    grid = Table(box=None, pad_edge=False, show_edge=False, highlight=False)
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*(Text(str(v)) for v in row))  # cells are text, never rich markup
    width = None if sys.stdout.isatty() else 100_000
    Console(soft_wrap=True, highlight=False, width=width).print(grid)


def single_node(
    ctx: typer.Context, nodes: Sequence[str], endpoints: Sequence[str], *, what: str, hint: str
) -> str:
    """The one node a verb works on: from -n, else the context's nodes, else its endpoint."""
    from basalt.machinery.errors import BasaltError

    targets = list(nodes)
    if not targets:
        opts = options(ctx)
        _, context = opts.load_client_config().current(opts.context)
        targets = list(context.nodes) or (list(endpoints) or list(context.endpoints))[:1]
    if len(targets) != 1:
        raise BasaltError(
            f"{what}; {len(targets)} are targeted ({', '.join(targets) or 'none'})", hint=hint
        )
    return targets[0]
