"""etcd verbs: ``etcd members|status|leave|remove-member|forfeit-leadership|snapshot|defrag``,
``etcd alarm list|disarm``, and the top-level ``bootstrap``.

etcd runs on control planes; every verb asks the node's API, which talks to its local
etcd member. ``snapshot`` and ``bootstrap`` act on one node: a snapshot streams into
``FILE.part`` and is renamed into place only when the whole stream arrived, so a
failure never leaves a truncated file under the name asked for. ``bootstrap
--recover-from`` uploads the snapshot straight to the node (client-streaming requests
are not forwarded) and checks the file before anything is sent.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run, single_node, split, table
from ._common import info

if TYPE_CHECKING:
    from basalt.machinery.api import common_pb2
    from basalt.machinery.client.client import Client

app = typer.Typer(
    help="Manage etcd on control planes: members, status, snapshots, alarms.",
    no_args_is_help=True,
)
alarm_app = typer.Typer(
    help="List and disarm etcd alarms (NOSPACE, CORRUPT).", no_args_is_help=True
)
app.add_typer(alarm_app, name="alarm")

#: Size of the Data chunks of a snapshot upload.
UPLOAD_CHUNK = 64 * 1024
#: etcd appends the SHA-256 of the database to a snapshot; a bolt database is a whole
#: number of 512-byte sectors, so a size of 32 past such a multiple means a hash is there.
_HASH_SIZE = 32


def _one_node(client: Client, verb: str) -> str:
    """The one node ``verb`` acts on (the endpoint itself when none is named)."""
    from basalt.machinery.errors import BasaltError

    if len(client.nodes) > 1:
        raise BasaltError(
            f"{verb} works on one node at a time; {len(client.nodes)} are targeted "
            f"({', '.join(client.nodes)})",
            hint="name one control plane with -n NODE",
        )
    return client.nodes[0] if client.nodes else client.endpoint


def _member_id(value: int) -> str:
    return f"{value:x}"


def _size(value: int) -> str:
    """Bytes in etcd's style (decimal units): 20 kB, 2.5 MB."""
    amount = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if amount < 1000 or unit == "GB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    raise AssertionError("unreachable")


async def _act(
    client: Client,
    failures: NodeFailures,
    rpc: str,
    request: object,
    timeout: float = 60,
    nodes: Sequence[str] | None = None,
) -> None:
    """Call an RPC answering ActionResponse and print each node's message."""
    answer = await getattr(client.machine, rpc)(
        request, metadata=client.metadata(nodes), timeout=timeout
    )
    for item in failures.keep(answer.messages):
        print(f"{item.metadata.node or client.endpoint}: {item.message}")


@app.command("members")
def members(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """List the etcd members, as each node sees them."""
    from basalt.machinery.api import common_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.EtcdMemberList(
            common_pb2.Empty(), metadata=client.metadata(), timeout=15
        )
        rows = []
        for item in failures.keep(answer.messages):
            for member in item.members:
                rows.append(
                    (
                        item.metadata.node or client.endpoint,
                        _member_id(member.id),
                        member.hostname,
                        ",".join(member.peer_urls),
                        ",".join(member.client_urls),
                        str(member.is_learner).lower(),
                    )
                )
        table(("NODE", "ID", "HOSTNAME", "PEER URLS", "CLIENT URLS", "LEARNER"), rows)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


@app.command("status")
def status(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """Show each node's etcd member: database size, leader, raft progress, errors."""
    from basalt.machinery.api import common_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.EtcdStatus(
            common_pb2.Empty(), metadata=client.metadata(), timeout=15
        )
        rows = []
        for item in failures.keep(answer.messages):
            share = f" ({item.db_size_in_use / item.db_size:.0%})" if item.db_size else ""
            rows.append(
                (
                    item.metadata.node or client.endpoint,
                    _member_id(item.member_id),
                    _size(item.db_size),
                    _size(item.db_size_in_use) + share,
                    _member_id(item.leader),
                    item.raft_index,
                    item.raft_term,
                    item.raft_applied_index,
                    str(item.is_learner).lower(),
                    "; ".join(item.errors),
                )
            )
        columns = (
            "NODE",
            "MEMBER",
            "DB SIZE",
            "IN USE",
            "LEADER",
            "RAFT INDEX",
            "RAFT TERM",
            "RAFT APPLIED INDEX",
            "LEARNER",
            "ERRORS",
        )
        table(columns, rows)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


@app.command("leave")
def leave(
    ctx: typer.Context,
    force: Annotated[
        bool, typer.Option("--force", help="Leave even when that costs quorum.")
    ] = False,
    destroy_last_member: Annotated[
        bool,
        typer.Option(
            "--destroy-last-member",
            help="Let the last member leave: ends the etcd cluster and deletes its data.",
        ),
    ] = False,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Make nodes leave the etcd cluster (their member is removed, their data wiped).
    os:admin only."""
    from basalt.machinery.api import machine_pb2

    request = machine_pb2.EtcdLeaveClusterRequest(
        force=force, destroy_last_member=destroy_last_member
    )

    async def work(client: Client, failures: NodeFailures) -> None:
        await _act(client, failures, "EtcdLeaveCluster", request)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


@app.command("remove-member")
def remove_member(
    ctx: typer.Context,
    member: Annotated[
        str, typer.Argument(help="The member's id (hex or decimal) or its host name.")
    ],
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Remove a member that is gone for good, asking one control plane that stays."""
    from basalt.machinery.api import machine_pb2

    request = machine_pb2.EtcdRemoveMemberRequest(member=member)

    async def work(client: Client, failures: NodeFailures) -> None:
        _one_node(client, "etcd remove-member")
        await _act(client, failures, "EtcdRemoveMember", request)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


@app.command("forfeit-leadership")
def forfeit_leadership(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """Make nodes that lead etcd hand leadership to another member."""
    from basalt.machinery.api import common_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        await _act(client, failures, "EtcdForfeitLeadership", common_pb2.Empty())

    run(ctx, work, nodes=nodes, endpoints=endpoints)


@app.command("defrag")
def defrag(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """Defragment nodes' etcd databases (each blocks its member while it runs)."""
    from basalt.machinery.api import common_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        await _act(client, failures, "EtcdDefragment", common_pb2.Empty(), timeout=300)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


@alarm_app.command("list")
def alarm_list(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """List the alarms raised in etcd, as each node sees them."""
    from basalt.machinery.api import common_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.EtcdAlarmList(
            common_pb2.Empty(), metadata=client.metadata(), timeout=15
        )
        rows = []
        for item in failures.keep(answer.messages):
            for alarm in item.alarms:
                node = item.metadata.node or client.endpoint
                rows.append((node, _member_id(alarm.member_id), alarm.alarm))
        table(("NODE", "MEMBER", "ALARM"), rows)

    run(ctx, work, nodes=nodes, endpoints=endpoints)


@alarm_app.command("disarm")
def alarm_disarm(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """Disarm etcd's alarms (after the cause, e.g. a full disk, is fixed)."""
    from basalt.machinery.api import common_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        await _act(client, failures, "EtcdAlarmDisarm", common_pb2.Empty())

    run(ctx, work, nodes=nodes, endpoints=endpoints)


class _SnapshotSink:
    """Writes the stream to a file and hashes it: the whole (shown) and all but the
    last 32 bytes (checked against the hash etcd appends)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.size = 0
        self.whole = hashlib.sha256()
        self.body = hashlib.sha256()
        self.tail = b""

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.size += len(data)
        self.whole.update(data)
        joined = self.tail + data
        self.body.update(joined[:-_HASH_SIZE])
        self.tail = joined[-_HASH_SIZE:]

    def integrity(self) -> bool | None:
        """Whether etcd's appended hash matches (None: the snapshot carries none)."""
        if self.size % 512 != _HASH_SIZE:
            return None
        return self.body.digest() == self.tail


@app.command("snapshot")
def snapshot(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(metavar="FILE", help="Where to write the snapshot.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite FILE if it exists.")] = False,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Save a snapshot of etcd from one control plane into FILE."""
    from basalt.machinery.errors import BasaltError

    from ._common import refuse_overwrite

    refuse_overwrite([path], force)
    partial = path.with_name(path.name + ".part")

    async def work(client: Client, failures: NodeFailures) -> None:
        node = _one_node(client, "etcd snapshot")
        try:
            sink = await _receive_snapshot(client, failures, node, partial)
            if sink is None:
                return
            if sink.size == 0:
                raise BasaltError(f"{node}: the snapshot stream was empty; nothing was written")
            if sink.integrity() is False:
                raise BasaltError(
                    f"{node}: the snapshot's own SHA-256 does not match its contents; "
                    "nothing was written",
                    hint="take the snapshot again",
                )
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)  # gone already when the snapshot was kept
        info(f"{node}: snapshot saved to {path}")
        print(f"size: {sink.size} bytes")
        print(f"sha256: {sink.whole.hexdigest()}")

    try:
        run(ctx, work, nodes=nodes, endpoints=endpoints)
    except OSError as exc:
        raise BasaltError(f"cannot write the snapshot to {path}: {exc}") from None


async def _receive_snapshot(
    client: Client, failures: NodeFailures, node: str, partial: Path
) -> _SnapshotSink | None:
    """Stream the node's snapshot into ``partial``, synced; None when the node failed."""
    from basalt.machinery.api import common_pb2

    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        sink = _SnapshotSink(handle)
        async for chunk in client.machine.EtcdSnapshot(
            common_pb2.Empty(), metadata=client.metadata(), timeout=600
        ):
            meta = chunk.metadata
            if meta.error:
                failures.report(meta.node or node, meta.error, meta.code)
                return None
            sink.write(chunk.bytes)
        handle.flush()
        os.fsync(handle.fileno())
    return sink


async def _chunks(handle: IO[bytes]) -> AsyncIterator[common_pb2.Data]:
    from basalt.machinery.api import common_pb2

    while data := handle.read(UPLOAD_CHUNK):
        yield common_pb2.Data(bytes=data)


def _check_snapshot_file(path: Path) -> int:
    """The size of the snapshot to upload; refuses a missing, unreadable or empty one."""
    from basalt.machinery.errors import BasaltError

    try:
        info_ = path.stat()
    except FileNotFoundError:
        raise BasaltError(
            f"snapshot {path} does not exist; nothing was sent",
            hint="take one with 'basaltctl etcd snapshot FILE' while the cluster is up",
        ) from None
    except OSError as exc:
        raise BasaltError(f"snapshot {path} cannot be read: {exc.strerror}") from None
    if not path.is_file():
        raise BasaltError(f"snapshot {path} is not a regular file; nothing was sent")
    if info_.st_size == 0:
        raise BasaltError(
            f"snapshot {path} is empty; nothing was sent",
            hint="an interrupted 'etcd snapshot' leaves FILE.part, never FILE: use another file",
        )
    if not os.access(path, os.R_OK):
        raise BasaltError(f"snapshot {path} cannot be read: permission denied; nothing was sent")
    return info_.st_size


def _bootstrap_node(ctx: typer.Context, nodes: list[str], endpoints: list[str]) -> str:
    """The one control plane to bootstrap."""
    return single_node(
        ctx,
        nodes,
        endpoints,
        what="bootstrap works on exactly one control plane",
        hint="name it with -n NODE",
    )


def bootstrap(
    ctx: typer.Context,
    recover_from: Annotated[
        Path | None,
        typer.Option(
            "--recover-from",
            metavar="FILE",
            help="Start etcd from this snapshot (from 'etcd snapshot') instead of empty.",
        ),
    ] = None,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Start the etcd cluster on one control plane; the others then join it.

    Once per cluster. --recover-from uploads a snapshot to the node and starts etcd from it.
    """
    from basalt.machinery.api import machine_pb2

    if recover_from is not None:
        _recover(ctx, recover_from, split(nodes), split(endpoints))
        return

    async def start(client: Client, failures: NodeFailures) -> None:
        _one_node(client, "bootstrap")
        await _act(client, failures, "Bootstrap", machine_pb2.BootstrapRequest(), 120)

    run(ctx, start, nodes=nodes, endpoints=endpoints)


def _recover(ctx: typer.Context, snapshot_file: Path, nodes: list[str], dial: list[str]) -> None:
    """Upload ``snapshot_file`` to the node, then bootstrap it from the upload."""
    from basalt.machinery.api import machine_pb2
    from basalt.machinery.errors import BasaltError

    size = _check_snapshot_file(snapshot_file)
    node = _bootstrap_node(ctx, nodes, dial)
    if dial and dial != [node]:
        raise BasaltError(
            f"bootstrap --recover-from uploads straight to the node, but -e names "
            f"{', '.join(dial)}, not {node}",
            hint=f"drop -e, or pass -e {node}",
        )

    async def work(client: Client, failures: NodeFailures) -> None:
        with snapshot_file.open("rb") as handle:
            # No target metadata: the node answers itself (uploads are not forwarded).
            answer = await client.machine.EtcdRecover(
                _chunks(handle), metadata=client.metadata([]), timeout=600
            )
        if len(failures.keep(answer.messages)) != len(answer.messages):
            return
        info(f"{node}: uploaded {snapshot_file} ({size} bytes)")
        request = machine_pb2.BootstrapRequest(recover_etcd=True)
        await _act(client, failures, "Bootstrap", request, 300, nodes=[])

    try:
        run(ctx, work, nodes=[node], endpoints=[node])
    except OSError as exc:
        raise BasaltError(f"snapshot {snapshot_file} cannot be read: {exc}") from None
