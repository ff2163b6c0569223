"""``basaltctl wipe disk DEV``: wipe a disk (or partition) the node does not use.

The node decides what may be wiped and refuses, with every reason, its system disk and
anything mounted, held, in use as swap, attached or read-only (basalt.machined.storage.wipe).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run, split

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client

app = typer.Typer(help="Wipe disks the node does not use.", no_args_is_help=True)


@app.command("disk")
def disk(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="The device on the node, e.g. vdb or /dev/vdb.")],
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="fast: discard, zero the first and last MiB; zeroes: zero all of it.",
        ),
    ] = "fast",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", help="Seconds to wait (default: 120 fast, 24 h zeroes)."),
    ] = None,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Wipe DEVICE on the target nodes. Its data is gone afterwards."""
    from basalt.machinery.api import machine_pb2
    from basalt.machinery.errors import BasaltError

    methods = {"fast": machine_pb2.FAST, "zeroes": machine_pb2.ZEROES}
    if method not in methods:
        raise BasaltError(f"--method {method!r} is not a wipe method", hint="fast or zeroes")
    targets = split(nodes)
    where = ", ".join(targets) or "the context's nodes"
    if not yes:
        if not sys.stdin.isatty():
            raise BasaltError(
                f"wiping {device} on {where} destroys its data: confirmation needed",
                hint="pass --yes to wipe without a question",
            )
        typer.confirm(f"Wipe {device} on {where}? Its data will be gone", abort=True)
    request = machine_pb2.WipeDiskRequest(device=device, method=methods[method])
    wait = timeout if timeout is not None else (120.0 if method == "fast" else 24 * 3600.0)

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.WipeDisk(request, metadata=client.metadata(), timeout=wait)
        for item in failures.keep(answer.messages):
            print(f"{item.metadata.node or client.endpoint}: {item.message}")

    run(ctx, work, nodes=nodes, endpoints=endpoints)
