"""The fleet's end of machine links: the ``FleetLink`` gRPC service and the tunnels.

A machine authenticates with its link certificate (mTLS against the fleet CA); the
certificate's serial must be the one its enrolment recorded, so a removed or re-enrolled
machine's old certificate is refused. While a machine is linked, the fleet reaches its
API through a per-machine Unix socket that this module listens on: every connection to
it becomes one tunnel in the machine's stream, and the bytes (TLS between the fleet's
client and the node's API) pass through unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from google.protobuf.json_format import MessageToDict

from basalt.machinery.api import fleet_pb2, fleet_pb2_grpc

from . import service
from .db import Database, Machine, utcnow
from .metrics import Metrics

log = logging.getLogger("basalt.fleet.link")

HEARTBEAT_INTERVAL = 10
TUNNEL_OPEN_TIMEOUT = 10.0
CHUNK = 64 * 1024
#: How often last-seen times are written (in one batch), not at every heartbeat.
SEEN_FLUSH = 10.0

Outbox = asyncio.Queue[fleet_pb2.FleetMessage | None]


@dataclass
class Tunnel:
    writer: asyncio.StreamWriter
    opened: asyncio.Future[str]


@dataclass
class MachineLink:
    """One machine linked to this replica."""

    uuid: str
    outbox: Outbox
    inventory: dict[str, Any]
    connected_at: float = field(default_factory=time.monotonic)
    tunnels: dict[int, Tunnel] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    server: asyncio.AbstractServer | None = None
    socket: Path | None = None

    def close(self) -> None:
        self.outbox.put_nowait(None)
        for tunnel in self.tunnels.values():
            tunnel.writer.close()
            if not tunnel.opened.done():
                tunnel.opened.set_result("the machine's link ended")
        self.tunnels.clear()
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.socket is not None:
            self.socket.unlink(missing_ok=True)
            self.socket = None

    # -- tunnels -----------------------------------------------------------------------------
    async def socket_path(self, directory: Path) -> Path:
        """A Unix socket whose connections are tunnels to the node's API port."""
        if self.socket is None:
            path = directory / f"{self.uuid}.sock"
            path.unlink(missing_ok=True)
            self.server = await asyncio.start_unix_server(self._accept, path=str(path))
            self.socket = path
        return self.socket

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tunnel_id = next(self.ids)
        opened: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.tunnels[tunnel_id] = Tunnel(writer, opened)
        await self.outbox.put(fleet_pb2.FleetMessage(open=fleet_pb2.TunnelOpen(id=tunnel_id)))
        try:
            error = await asyncio.wait_for(opened, TUNNEL_OPEN_TIMEOUT)
        except TimeoutError:
            error = "the machine did not answer the tunnel in time"
        if error:
            log.info("tunnel to %s not opened: %s", self.uuid, error)
            self.tunnels.pop(tunnel_id, None)
            writer.close()
            return
        try:
            while data := await reader.read(CHUNK):
                await self.outbox.put(
                    fleet_pb2.FleetMessage(data=fleet_pb2.TunnelData(id=tunnel_id, data=data))
                )
        except OSError:
            pass
        finally:
            if self.tunnels.pop(tunnel_id, None) is not None:
                writer.close()
                await self.outbox.put(
                    fleet_pb2.FleetMessage(close=fleet_pb2.TunnelClose(id=tunnel_id))
                )

    async def from_machine(self, message: fleet_pb2.MachineMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "opened":
            tunnel = self.tunnels.get(message.opened.id)
            if tunnel is not None and not tunnel.opened.done():
                tunnel.opened.set_result(message.opened.error)
        elif kind == "data":
            tunnel = self.tunnels.get(message.data.id)
            if tunnel is not None:
                tunnel.writer.write(message.data.data)
                with contextlib.suppress(ConnectionError):
                    await tunnel.writer.drain()
        elif kind == "close":
            tunnel = self.tunnels.pop(message.close.id, None)
            if tunnel is not None:
                tunnel.writer.close()
                if not tunnel.opened.done():
                    tunnel.opened.set_result(message.close.reason or "closed")


def inventory_dict(inventory: fleet_pb2.Inventory) -> dict[str, Any]:
    return MessageToDict(inventory, preserving_proto_field_name=True)


def _peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str]:
    auth = context.auth_context()
    pem = next(iter(auth.get("x509_pem_cert") or ()), b"")
    if not pem:
        return "", ""
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return (str(names[0].value) if names else ""), format(cert.serial_number, "x")


class LinkService(fleet_pb2_grpc.FleetLinkServicer):
    """Holds this replica's links; ``links`` is keyed by machine UUID."""

    def __init__(
        self,
        database: Database,
        metrics: Metrics,
        replica: str,
        socket_dir: Path | None = None,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.database = database
        self.metrics = metrics
        self.replica = replica
        self.links: dict[str, MachineLink] = {}
        self.socket_dir = socket_dir or Path(tempfile.mkdtemp(prefix="basalt-fleet-"))
        self.seen: dict[str, float] = {}
        self.on_change = on_change

    # -- the service -------------------------------------------------------------------------
    async def Connect(
        self,
        request_iterator: AsyncIterator[fleet_pb2.MachineMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[fleet_pb2.FleetMessage]:
        uuid, serial = _peer_identity(context)
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "hello" or first.hello.machine_uuid != uuid:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first message must be a Hello naming the certificate's machine",
            )
        inventory = inventory_dict(first.hello.inventory)
        try:
            labels = await asyncio.to_thread(self._linked, uuid, serial, inventory)
        except service.Refused as exc:
            log.warning("link refused: %s", exc)
            self.metrics.link_refusals.inc()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            raise
        link = MachineLink(uuid, asyncio.Queue(), inventory)
        previous = self.links.pop(uuid, None)
        if previous is not None:
            previous.close()
        self.links[uuid] = link
        self.metrics.connections.set(len(self.links))
        if self.on_change is not None:
            self.on_change(uuid)
        reader = asyncio.create_task(self._read(link, request_iterator), name=f"link-{uuid}")
        try:
            yield fleet_pb2.FleetMessage(
                welcome=fleet_pb2.Welcome(heartbeat_interval=HEARTBEAT_INTERVAL, labels=labels)
            )
            while (message := await link.outbox.get()) is not None:
                yield message
        finally:
            reader.cancel()
            if self.links.get(uuid) is link:
                del self.links[uuid]
                link.close()
                self.metrics.connections.set(len(self.links))
                await asyncio.to_thread(self._unlinked, uuid)
                if self.on_change is not None:
                    self.on_change(uuid)

    async def _read(
        self, link: MachineLink, request_iterator: AsyncIterator[fleet_pb2.MachineMessage]
    ) -> None:
        try:
            async for message in request_iterator:
                self.seen[link.uuid] = time.time()
                kind = message.WhichOneof("kind")
                self.metrics.link_messages.labels(kind or "unknown").inc()
                if kind == "inventory":
                    link.inventory = inventory_dict(message.inventory)
                    await asyncio.to_thread(self._inventory, link.uuid, link.inventory)
                    if self.on_change is not None:
                        self.on_change(link.uuid)
                elif kind != "heartbeat":
                    await link.from_machine(message)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            link.outbox.put_nowait(None)

    # -- the database ------------------------------------------------------------------------
    def _linked(self, uuid: str, serial: str, inventory: dict[str, Any]) -> dict[str, str]:
        with self.database.session() as session:
            machine = service.link_machine(session, uuid, serial)
            machine.inventory = inventory
            machine.hostname = str(inventory.get("hostname", machine.hostname))
            machine.last_seen = utcnow()
            machine.replica = self.replica
            return {str(k): str(v) for k, v in machine.labels.items()}

    def _inventory(self, uuid: str, inventory: dict[str, Any]) -> None:
        with self.database.session() as session:
            machine = session.get(Machine, uuid)
            if machine is not None:
                machine.inventory = inventory
                machine.hostname = str(inventory.get("hostname", machine.hostname))

    def _unlinked(self, uuid: str) -> None:
        with self.database.session() as session:
            machine = session.get(Machine, uuid)
            if machine is not None and machine.replica == self.replica:
                machine.replica = ""
                machine.last_seen = utcnow()

    def flush_seen(self) -> int:
        """Write the last-seen times gathered since the last flush, in one statement."""
        if not self.seen:
            return 0
        import datetime as dt

        from sqlalchemy import bindparam

        batch, self.seen = self.seen, {}
        rows = [
            {"key": uuid, "seen": dt.datetime.fromtimestamp(at, dt.UTC)}
            for uuid, at in batch.items()
        ]
        table = Machine.__table__
        statement = (
            table.update()  # type: ignore[attr-defined]
            .where(table.c.uuid == bindparam("key"))
            .values(last_seen=bindparam("seen"))
        )
        with self.database.engine.begin() as connection:
            connection.execute(statement, rows)
        return len(rows)

    async def flush_loop(self) -> None:
        while True:
            await asyncio.sleep(SEEN_FLUSH)
            try:
                await asyncio.to_thread(self.flush_seen)
            except Exception as exc:  # the database may be restarting: keep linking
                log.warning("could not record last-seen times: %s", exc)

    def close_all(self) -> None:
        for link in list(self.links.values()):
            link.close()
        self.links.clear()
