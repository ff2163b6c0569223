"""Replicas: several fleet processes on one PostgreSQL serve the same fleet.

- Leadership: one replica runs the controllers (clusters being applied or deleted,
  periodic drift checks). It holds a PostgreSQL session advisory lock on a connection
  of its own; when it dies its session ends, the lock is free, and the next replica that
  asks (every ``ELECTION_INTERVAL`` seconds) takes over. On SQLite the one process leads.
- Presence: each replica writes its name and forwarding address to ``replicas`` every
  few seconds; a machine's row names the replica that holds its link.
- Forwarding: a call to a machine whose link another replica holds goes to that
  replica's forwarding port (TLS, both ends with a replica certificate of the fleet's
  CA; a machine's certificate is refused), which joins it to the machine's tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select, text

from basalt.machinery.errors import BasaltError, ErrorKind

from .core import Fleet
from .db import Machine, Replica, aware, utcnow
from .pki import REPLICA_ORGANIZATION

log = logging.getLogger("basalt.fleet.replicas")

LEADER_LOCK = 0x6C656164  # "lead"
ELECTION_INTERVAL = 2.0
PRESENCE_INTERVAL = 3.0
#: A replica not seen for this long holds no links any more.
PRESENCE_TTL = 20.0
CHUNK = 64 * 1024


class ForwardError(BasaltError):
    kind = ErrorKind.UNAVAILABLE


class Replicas:
    """This replica's leadership, presence and forwarding."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.is_leader = not fleet.database.is_postgresql
        self._lock_connection: Any = None
        # ssl reads a key only from a file: a private directory, gone once it is read.
        with tempfile.TemporaryDirectory(prefix="basalt-fleet-replica-") as tmp:
            crt, key, ca = fleet.write_tls(Path(tmp))
            self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.server_context.load_cert_chain(crt, key)
            self.server_context.load_verify_locations(cafile=ca)
            self.server_context.verify_mode = ssl.CERT_REQUIRED
            self.client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.client_context.load_cert_chain(crt, key)
            self.client_context.load_verify_locations(cafile=ca)
            self.client_context.check_hostname = False
        self.server: asyncio.AbstractServer | None = None
        self.remote_servers: dict[str, tuple[asyncio.AbstractServer, Path]] = {}
        self.on_leader: Callable[[], Awaitable[None]] | None = None
        fleet.metrics.leader.set(1 if self.is_leader else 0)

    @property
    def forward_address(self) -> str:
        return f"{self.fleet.options.host}:{self.fleet.options.effective_forward_port}"

    # -- leadership ------------------------------------------------------------------------
    def _try_lead(self) -> bool:
        if not self.fleet.database.is_postgresql:
            return True
        try:
            if self._lock_connection is None:
                self._lock_connection = self.fleet.database.engine.connect()
                held = self._lock_connection.execute(
                    text("SELECT pg_try_advisory_lock(:k)"), {"k": LEADER_LOCK}
                ).scalar()
                self._lock_connection.commit()
                if not held:
                    self._lock_connection.close()
                    self._lock_connection = None
                return bool(held)
            self._lock_connection.execute(text("SELECT 1"))  # still our session?
            self._lock_connection.commit()
            return True
        except Exception as exc:  # the database went away: so did the lock
            log.warning("leadership check failed: %s", exc)
            with contextlib.suppress(Exception):
                if self._lock_connection is not None:
                    self._lock_connection.close()
            self._lock_connection = None
            return False

    async def elect(self) -> None:
        while True:
            leading = await asyncio.to_thread(self._try_lead)
            if leading != self.is_leader:
                self.is_leader = leading
                self.fleet.metrics.leader.set(1 if leading else 0)
                log.info("replica %s %s the leader", self.fleet.replica,
                         "is now" if leading else "is no longer")  # fmt: skip
            if leading and self.on_leader is not None:
                await self.on_leader()
            await asyncio.sleep(ELECTION_INTERVAL)

    # -- presence --------------------------------------------------------------------------
    def _present(self) -> None:
        with self.fleet.database.session() as session:
            row = session.get(Replica, self.fleet.replica)
            if row is None:
                session.add(
                    Replica(name=self.fleet.replica, forward=self.forward_address, seen=utcnow())
                )
            else:
                row.forward, row.seen = self.forward_address, utcnow()

    async def presence(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._present)
            except Exception as exc:
                log.warning("could not record this replica's presence: %s", exc)
            await asyncio.sleep(PRESENCE_INTERVAL)

    def replicas(self) -> list[dict[str, Any]]:
        with self.fleet.database.session() as session:
            rows = list(session.execute(select(Replica).order_by(Replica.name)).scalars())
        now = utcnow()
        out = []
        for row in rows:
            seen = aware(row.seen)
            alive = seen is not None and (now - seen).total_seconds() < PRESENCE_TTL
            out.append(
                {
                    "name": row.name,
                    "forward": row.forward,
                    "alive": alive,
                    "this": row.name == self.fleet.replica,
                }
            )
        return out

    def remove_self(self) -> None:
        with self.fleet.database.session() as session:
            row = session.get(Replica, self.fleet.replica)
            if row is not None:
                session.delete(row)

    # -- forwarding: the serving end ---------------------------------------------------------
    async def serve(self) -> None:
        host = self.fleet.options.host
        port = self.fleet.options.effective_forward_port
        self.server = await asyncio.start_server(
            self._forwarded, host, port, ssl=self.server_context
        )

    async def _forwarded(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from cryptography import x509

        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            cert = x509.load_der_x509_certificate(der)
            orgs = [
                str(a.value)
                for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATION_NAME)
            ]
            if REPLICA_ORGANIZATION not in orgs:
                writer.write(b"ERR only replicas may forward\n")
                return
            line = (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
            verb, _, uuid = line.partition(" ")
            link = self.fleet.links.links.get(uuid)
            if verb != "TUNNEL" or link is None:
                writer.write(f"ERR no link to {uuid} here\n".encode())
                return
            socket = await link.socket_path(self.fleet.links.socket_dir)
            local_reader, local_writer = await asyncio.open_unix_connection(str(socket))
            writer.write(b"OK\n")
            await writer.drain()
            await _pipe_both(reader, writer, local_reader, local_writer)
        except (OSError, TimeoutError, ValueError, ssl.SSLError) as exc:
            log.info("forwarding refused or ended: %s", exc)
        finally:
            writer.close()

    # -- forwarding: the asking end ----------------------------------------------------------
    def owner(self, uuid: str) -> str:
        """The forwarding address of the live replica that holds ``uuid``'s link ('' if
        none does)."""
        with self.fleet.database.session() as session:
            machine = session.get(Machine, uuid)
            if machine is None or not machine.replica or machine.replica == self.fleet.replica:
                return ""
            replica = session.get(Replica, machine.replica)
            seen = aware(replica.seen) if replica is not None else None
            if replica is None or seen is None:
                return ""
            if (utcnow() - seen).total_seconds() >= PRESENCE_TTL:
                return ""
            return replica.forward

    def forget_others(self) -> None:
        """On SQLite this process is the only replica: links recorded for any other
        (a process that was killed) are stale."""
        if self.fleet.database.is_postgresql:
            return
        from sqlalchemy import delete, update

        with self.fleet.database.session() as session:
            session.execute(delete(Replica).where(Replica.name != self.fleet.replica))
            session.execute(
                update(Machine).where(Machine.replica != self.fleet.replica).values(replica="")
            )

    async def remote_socket(self, uuid: str) -> Path | None:
        """A local Unix socket whose connections reach ``uuid``'s tunnel on the replica
        that holds its link; None when no replica does."""
        address = await asyncio.to_thread(self.owner, uuid)
        if not address:
            return None
        host, _, port = address.rpartition(":")
        try:  # a replica that just died still looks alive for a while
            _probe_reader, probe = await asyncio.wait_for(
                asyncio.open_connection(host, int(port)), 3
            )
            probe.close()
        except (OSError, TimeoutError):
            return None
        known = self.remote_servers.get(uuid)
        if known is not None:
            return known[1]
        path = self.fleet.links.socket_dir / f"remote-{uuid}.sock"
        path.unlink(missing_ok=True)

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                remote_reader, remote_writer = await asyncio.open_connection(
                    host, int(port), ssl=self.client_context, server_hostname="basalt-fleet"
                )
                remote_writer.write(f"TUNNEL {uuid}\n".encode())
                await remote_writer.drain()
                answer = (await asyncio.wait_for(remote_reader.readline(), 10)).decode()
                if not answer.startswith("OK"):
                    log.info("replica %s refused a tunnel to %s: %s", address, uuid, answer)
                    remote_writer.close()
                    return
                await _pipe_both(reader, writer, remote_reader, remote_writer)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                log.info("forwarding to %s failed: %s", address, exc)
            finally:
                writer.close()

        server = await asyncio.start_unix_server(accept, path=str(path))
        self.remote_servers[uuid] = (server, path)
        return path

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for server, path in self.remote_servers.values():
            server.close()
            path.unlink(missing_ok=True)
        if self._lock_connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._lock_connection.close)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.remove_self)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def _pipe_both(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    try:
        await asyncio.gather(_pipe(a_reader, b_writer), _pipe(b_reader, a_writer))
    finally:
        a_writer.close()
        b_writer.close()
