"""Files on nodes: ls, read, copy.

``read`` and ``copy`` move file contents, so they talk to exactly one node. ``copy``
spools the node's tar stream to a temporary file and checks every member before it
extracts anything: a stream that names absolute paths, climbs out with ``..`` or holds
links that lead out of the destination is refused whole.
"""

from __future__ import annotations

import datetime as dt
import os
import posixpath
import stat
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run, table
from ._common import info, warn

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client


def ls(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="Directory or file on the node.")] = "/",
    recurse: Annotated[
        bool, typer.Option("-r", "--recurse", help="Descend into directories.")
    ] = False,
    depth: Annotated[
        int | None,
        typer.Option("--depth", min=0, help="Levels to descend (implies -r; 0: no limit)."),
    ] = None,
    long: Annotated[bool, typer.Option("-l", "--long", help="Mode, size and time too.")] = False,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """List files on nodes."""
    from basalt.machinery.api import machine_pb2

    request = machine_pb2.ListRequest(
        root=path, recurse=recurse or depth is not None, max_depth=depth or 0
    )

    async def work(client: Client, failures: NodeFailures) -> None:
        rows: list[tuple[object, ...]] = []
        async for entry in client.machine.List(request, metadata=client.metadata()):
            node = entry.metadata.node
            if entry.metadata.error:
                failures.report(node, entry.metadata.error, entry.metadata.code)
                continue
            if entry.error:
                warn(f"{node}: {entry.name}: {entry.error}")
            name = entry.relative_name or entry.name
            if entry.link:
                name += f" -> {entry.link}"
            if long:
                when = dt.datetime.fromtimestamp(entry.modified).strftime("%Y-%m-%d %H:%M:%S")
                rows.append((node, stat.filemode(entry.mode), entry.size, when, name))
            else:
                rows.append((node, name))
        rows.sort(key=lambda row: str(row[0]))  # nodes answer interleaved; keep each in order
        columns = ("NODE", "MODE", "SIZE(B)", "MODIFIED", "NAME") if long else ("NODE", "NAME")
        table(columns, rows)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


def _one_node(client: Client, verb: str) -> None:
    from basalt.machinery.errors import BasaltError

    if len(client.nodes) > 1:
        raise BasaltError(
            f"{verb} works on one node at a time; {len(client.nodes)} are targeted "
            f"({', '.join(client.nodes)})",
            hint="name one node with -n NODE",
        )


def read(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="Regular file on the node.")],
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Write a file from one node to stdout, byte for byte."""
    from basalt.machinery.api import machine_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        _one_node(client, "read")
        out = sys.stdout.buffer
        request = machine_pb2.ReadRequest(path=path)
        async for chunk in client.machine.Read(request, metadata=client.metadata()):
            if chunk.metadata.error:
                failures.report(chunk.metadata.node, chunk.metadata.error, chunk.metadata.code)
                continue
            out.write(chunk.bytes)
        out.flush()

    run(ctx, work, nodes=nodes, endpoints=endpoints)


def copy(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="File or directory on the node.")],
    local: Annotated[
        str, typer.Argument(metavar="LOCAL_DIR", help="Extract into this directory; '-': tar.")
    ],
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Copy a file or directory from one node (as a tar archive, extracted safely)."""
    from basalt.machinery.api import machine_pb2

    request = machine_pb2.CopyRequest(root_path=path)
    raw = local == "-"

    async def work(client: Client, failures: NodeFailures) -> None:
        _one_node(client, "copy")
        with tempfile.TemporaryFile(prefix="basalt-copy-") as spool:
            sink: IO[bytes] = sys.stdout.buffer if raw else spool
            received = False
            async for chunk in client.machine.Copy(request, metadata=client.metadata()):
                if chunk.metadata.error:
                    failures.report(chunk.metadata.node, chunk.metadata.error, chunk.metadata.code)
                    continue
                sink.write(chunk.bytes)
                received = True
            sink.flush()
            if raw or not received:
                return
            spool.seek(0)
            extract(spool, Path(local))

    run(ctx, work, nodes=nodes, endpoints=endpoints)


def unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why extracting ``member`` could write outside the destination, or None when it cannot."""
    name = member.name
    if name.startswith("/") or os.path.isabs(name):
        return "absolute name"
    if ".." in name.split("/"):
        return "name climbs out with '..'"
    if member.issym():
        if member.linkname.startswith("/"):
            return f"symlink to an absolute path ({member.linkname})"
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
        if target == ".." or target.startswith("../"):
            return f"symlink pointing outside ({member.linkname})"
    if member.islnk():
        target = posixpath.normpath(member.linkname)
        if member.linkname.startswith("/") or target == ".." or target.startswith("../"):
            return f"hard link pointing outside ({member.linkname})"
    return None


def extract(archive: IO[bytes], destination: Path) -> None:
    """Extract a tar archive into ``destination`` after checking every member.

    Raises :class:`BasaltError` listing every unsafe member, before anything is written.
    Devices and pipes are skipped with a warning. Extraction itself uses tarfile's
    ``data`` filter, as a second line of defence.
    """
    from basalt.machinery.errors import BasaltError

    try:
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            members = tar.getmembers()
            problems = [
                f"{m.name}: {why}" for m in members if (why := unsafe_member(m)) is not None
            ]
            if problems:
                raise BasaltError(
                    "refusing to extract the archive from the node; nothing was written:\n  "
                    + "\n  ".join(problems),
                    hint="copy a narrower path, or take the raw archive with 'copy PATH -'",
                )
            kept = []
            for member in members:
                if member.isdev() or member.isfifo():
                    warn(f"skipped {member.name}: special files are not extracted")
                else:
                    kept.append(member)
            destination.mkdir(parents=True, exist_ok=True)
            tar.extractall(destination, members=kept, filter="data")
    except tarfile.TarError as exc:
        raise BasaltError(f"the archive from the node cannot be extracted: {exc}") from None
    except OSError as exc:
        raise BasaltError(f"cannot extract into {destination}: {exc}") from None
    info(f"copied {len(kept)} entries into {destination}")
