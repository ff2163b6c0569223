"""``basaltctl containers``: images and one-shot containers on a node's containerd, and
what runs there.

Everything runs in containerd namespace ``basalt`` (the kubelet's CRI uses ``k8s.io``);
``ps`` lists every namespace unless told one. ``import`` streams the tar to the node
itself (uploads are never forwarded).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ._api import (
    EndpointsOption,
    NodeFailures,
    NodesOption,
    print_chunks,
    run,
    single_node,
    split,
    table,
)
from ._common import info

if TYPE_CHECKING:
    from basalt.machinery.api import machine_pb2
    from basalt.machinery.client.client import Client

UPLOAD_CHUNK = 256 * 1024

app = typer.Typer(
    help="Container images and one-shot containers on a node (containerd, namespace basalt).",
    no_args_is_help=True,
)


async def _requests(path: Path, name: str) -> AsyncIterator[machine_pb2.ImageImportRequest]:
    from basalt.machinery.api import machine_pb2

    yield machine_pb2.ImageImportRequest(options=machine_pb2.ImageImportOptions(name=name))
    with path.open("rb") as handle:
        while chunk := handle.read(UPLOAD_CHUNK):
            yield machine_pb2.ImageImportRequest(data=chunk)


@app.command("import")
def import_(
    ctx: typer.Context,
    archive: Annotated[
        Path, typer.Argument(help="OCI image layout tar, or a docker-archive tar (docker save).")
    ],
    name: Annotated[
        str, typer.Option("--name", help="Image name (default: the one the archive gives).")
    ] = "",
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Import an image tar into the node's containerd (no registry involved)."""
    from basalt.machinery.errors import BasaltError

    if not archive.is_file():
        what = "does not exist" if not archive.exists() else "is not a file"
        raise BasaltError(
            f"image archive {archive} {what}",
            hint="give an OCI image layout tar or a docker-archive tar",
        )
    node = single_node(
        ctx,
        split(nodes),
        split(endpoints),
        what="import uploads to one node at a time",
        hint="name it with -n NODE (the node is dialled directly)",
    )

    from basalt.machinery.client.client import upload

    async def work(client: Client, failures: NodeFailures) -> None:
        info(f"{node}: uploading {archive} ({archive.stat().st_size} bytes)")
        answer = await upload(
            client.machine.ImageImport,
            _requests(archive, name),
            metadata=client.metadata([]),
            timeout=600,
        )
        for item in failures.keep(answer.messages):
            print(f"{item.metadata.node}: imported {item.name} ({item.digest})")

    run(ctx, work, nodes=[node], endpoints=[node])


@app.command("images")
def images(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """List the images imported on nodes."""
    from basalt.machinery.api import common_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.ImageList(
            common_pb2.Empty(), metadata=client.metadata(), timeout=30
        )
        rows = []
        for item in failures.keep(answer.messages):
            for image in item.images:
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(image.created))
                rows.append((item.metadata.node, image.name, image.digest, image.size, created))
        table(("NODE", "IMAGE", "DIGEST", "MANIFEST SIZE", "CREATED (UTC)"), rows)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="An imported image (see `containers images`).")],
    args: Annotated[
        list[str] | None, typer.Argument(help="Command and arguments (after --): replace the cmd.")
    ] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="NAME=value (repeat).")] = None,
    timeout: Annotated[
        int, typer.Option("--timeout", help="Kill the container after this many seconds.")
    ] = 60,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Run a container to completion and print its output; exits with its exit code.

    The container gets its own namespaces (an empty network namespace included). Its
    output stays readable with `basaltctl logs containers/ID`.
    """
    from basalt.machinery.api import machine_pb2

    request = machine_pb2.ContainerRunRequest(
        image=image, args=list(args or []), env=list(env or []), timeout_seconds=timeout
    )
    codes: list[int] = []

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.ContainerRun(
            request, metadata=client.metadata(), timeout=timeout + 120
        )
        for item in failures.keep(answer.messages):
            node = item.metadata.node
            logs = machine_pb2.LogsRequest(id=item.log_id, tail_lines=-1)
            target = client.metadata([node]) if client.nodes else client.metadata([])
            chunks = client.machine.Logs(logs, metadata=target, timeout=30)
            await print_chunks(client, failures, chunks)
            how = "was killed after its timeout" if item.timed_out else "exited"
            info(f"{node}: {item.id} {how} with code {item.exit_code} (log {item.log_id})")
            codes.append(item.exit_code)

    run(ctx, work, nodes=nodes, endpoints=endpoints)
    failing = [c for c in codes if c != 0]
    if failing:
        raise typer.Exit(failing[0] if len(codes) == 1 else 1)


@app.command("ps")
def ps(
    ctx: typer.Context,
    kubernetes: Annotated[
        bool, typer.Option("-k", "--kubernetes", help="Only Kubernetes' containers (k8s.io).")
    ] = False,
    namespace: Annotated[
        str, typer.Option("--namespace", help="Only this containerd namespace (default: all).")
    ] = "",
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """List the containers on nodes with their tasks (pid, status), every namespace."""
    from basalt.machinery.api import machine_pb2

    from .node_info import container_namespace

    request = machine_pb2.ContainersRequest(namespace=container_namespace(kubernetes, namespace))

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.Containers(request, metadata=client.metadata(), timeout=30)
        rows = [
            (
                item.metadata.node,
                c.namespace,
                c.pod or "-",
                c.name or "-",
                c.id,
                c.image,
                c.pid or "-",
                c.status or "(no task)",
            )
            for item in failures.keep(answer.messages)
            for c in item.containers
        ]
        columns = ("NODE", "NAMESPACE", "POD", "NAME", "ID", "IMAGE", "PID", "STATUS")
        table(columns, rows)

    run(ctx, work, nodes=nodes, endpoints=endpoints)
