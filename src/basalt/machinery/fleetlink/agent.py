"""The machine's side of the link: enrol once, then keep one stream to the fleet open.

The agent only dials out. It sends a Hello with the inventory, heartbeats, and a new
inventory when it changes; the fleet opens tunnels in the stream, and the agent joins
each to a TCP connection to the node's own API port and copies bytes both ways. It does
not look into them: they are TLS between the fleet (or an operator behind it) and the
node's API, which authenticates them itself.

Reconnects back off from ``BACKOFF_MIN`` to ``BACKOFF_MAX`` seconds with full jitter, so
a fleet that restarts is reached again within about ``BACKOFF_MAX`` seconds, and a
thousand machines do not knock at the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from ..api import fleet_pb2, fleet_pb2_grpc
from ..errors import BasaltError
from .enrol import EnrolmentError, LinkIdentity, enrol
from .url import FleetURL

log = logging.getLogger("basalt.fleetlink")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 5.0
#: After a refusal (token used up, machine removed) the agent asks again this rarely.
REFUSED_RETRY = 60.0
HEARTBEAT = 10.0
INVENTORY_CHECK = 2.0
CHUNK = 64 * 1024

Inventory = Callable[[], fleet_pb2.Inventory]


@dataclass
class LinkStatus:
    """What the agent reports about itself (machined publishes it as a resource)."""

    state: str = "starting"  # enrolling | connecting | connected | refused | backoff
    detail: str = ""
    connects: int = 0
    tunnels: int = 0


@dataclass
class FleetAgent:
    url: FleetURL
    #: Where the link identity is kept (survives reboots; ``identity.json``).
    directory: Path
    machine_uuid: str
    inventory: Inventory
    #: The node's API, as the agent dials it for a tunnel.
    api_host: str
    api_port: int
    hostname: str = ""
    heartbeat: float = HEARTBEAT
    status: LinkStatus = field(default_factory=LinkStatus)
    identity: LinkIdentity | None = None
    _writers: dict[int, asyncio.StreamWriter] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        """Enrol if needed, then hold the stream; never returns (cancel to stop)."""
        failures = 0
        while True:
            try:
                identity = await self._identity()
                await self._session(identity)
                failures = 0
                delay = random.uniform(0, BACKOFF_MIN)
            except asyncio.CancelledError:
                raise
            except EnrolmentError as exc:
                self._set("refused", str(exc))
                log.warning("fleet %s: %s", self.url.redacted(), exc)
                delay = REFUSED_RETRY
            except grpc.aio.AioRpcError as exc:
                failures += 1
                code = exc.code()
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    self._set("refused", f"{code.name}: {exc.details()}")
                    log.warning("fleet %s refused the link: %s", self.url.redacted(), exc.details())
                    delay = REFUSED_RETRY
                else:
                    delay = self._backoff(failures, f"{code.name}: {exc.details()}")
            except (BasaltError, OSError) as exc:
                failures += 1
                delay = self._backoff(failures, str(exc))
            await asyncio.sleep(delay)

    def _backoff(self, failures: int, reason: str) -> float:
        cap = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 8))
        delay = random.uniform(BACKOFF_MIN / 2, cap)
        self._set("backoff", reason)
        if failures == 1 or failures % 30 == 0:
            log.info("fleet link: %s; retrying (attempt %d)", reason, failures)
        return delay

    def _set(self, state: str, detail: str = "") -> None:
        self.status.state = state
        self.status.detail = detail

    async def _identity(self) -> LinkIdentity:
        if self.identity is None:
            self.identity = await asyncio.to_thread(LinkIdentity.load, self.directory)
        if self.identity is not None and self.identity.machine_uuid == self.machine_uuid:
            return self.identity
        self._set("enrolling")
        identity = await asyncio.to_thread(enrol, self.url, self.machine_uuid, self.hostname)
        await asyncio.to_thread(identity.save, self.directory)
        log.info("enrolled with the fleet at %s as %s", self.url.base, self.machine_uuid)
        self.identity = identity
        return identity

    # -- one session -----------------------------------------------------------------------
    async def _session(self, identity: LinkIdentity) -> None:
        self._set("connecting")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=identity.ca.encode(),
            private_key=identity.key.encode(),
            certificate_chain=identity.crt.encode(),
        )
        host = f"[{self.url.host}]" if ":" in self.url.host else self.url.host
        options = [
            # The fleet's certificate names the fleet, not the address a machine behind
            # NAT reaches it by; the chain is checked against the fleet's own CA.
            ("grpc.ssl_target_name_override", "basalt-fleet"),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.enable_retries", 0),
        ]
        outbox: asyncio.Queue[fleet_pb2.MachineMessage | None] = asyncio.Queue()
        async with grpc.aio.secure_channel(
            f"{host}:{identity.link_port}", credentials, options=options
        ) as channel:
            stub = fleet_pb2_grpc.FleetLinkStub(channel)
            hello = fleet_pb2.MachineMessage(
                hello=fleet_pb2.Hello(machine_uuid=self.machine_uuid, inventory=self.inventory())
            )
            await outbox.put(hello)
            call = stub.Connect(_drain(outbox))
            beat = asyncio.create_task(self._heartbeats(outbox), name="fleet-heartbeat")
            try:
                async for message in call:
                    await self._handle(message, outbox)
            finally:
                beat.cancel()
                await outbox.put(None)
                self._close_all("the link to the fleet ended")
        self._set("backoff", "the fleet ended the stream")

    async def _heartbeats(self, outbox: asyncio.Queue[fleet_pb2.MachineMessage | None]) -> None:
        """A heartbeat every ``heartbeat`` seconds; the inventory is looked at every
        ``INVENTORY_CHECK`` seconds and sent when it changed (a stage, an address)."""
        sequence = 0
        last = self.inventory()
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self.heartbeat
        while True:
            await asyncio.sleep(min(INVENTORY_CHECK, max(0.0, next_beat - loop.time())))
            current = self.inventory()
            if current != last:
                last = current
                await outbox.put(fleet_pb2.MachineMessage(inventory=current))
            if loop.time() >= next_beat:
                sequence += 1
                next_beat = loop.time() + self.heartbeat
                await outbox.put(
                    fleet_pb2.MachineMessage(heartbeat=fleet_pb2.Heartbeat(sequence=sequence))
                )

    async def _handle(
        self,
        message: fleet_pb2.FleetMessage,
        outbox: asyncio.Queue[fleet_pb2.MachineMessage | None],
    ) -> None:
        kind = message.WhichOneof("kind")
        if kind == "welcome":
            if message.welcome.heartbeat_interval:
                self.heartbeat = float(message.welcome.heartbeat_interval)
            self.status.connects += 1
            self._set("connected")
            log.info("fleet link up (%s)", self.url.base)
        elif kind == "open":
            self._spawn(self._tunnel(message.open.id, outbox))
        elif kind == "data":
            writer = self._writers.get(message.data.id)
            if writer is not None:
                writer.write(message.data.data)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
        elif kind == "close":
            writer = self._writers.pop(message.close.id, None)
            if writer is not None:
                writer.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tunnel(
        self, tunnel: int, outbox: asyncio.Queue[fleet_pb2.MachineMessage | None]
    ) -> None:
        try:
            reader, writer = await asyncio.open_connection(self.api_host, self.api_port)
        except OSError as exc:
            opened = fleet_pb2.TunnelOpened(id=tunnel, error=f"node API port: {exc}")
            await outbox.put(fleet_pb2.MachineMessage(opened=opened))
            return
        self._writers[tunnel] = writer
        self.status.tunnels += 1
        await outbox.put(fleet_pb2.MachineMessage(opened=fleet_pb2.TunnelOpened(id=tunnel)))
        reason = ""
        try:
            while data := await reader.read(CHUNK):
                await outbox.put(
                    fleet_pb2.MachineMessage(data=fleet_pb2.TunnelData(id=tunnel, data=data))
                )
        except OSError as exc:
            reason = str(exc)
        finally:
            if self._writers.pop(tunnel, None) is not None:
                writer.close()
                await outbox.put(
                    fleet_pb2.MachineMessage(close=fleet_pb2.TunnelClose(id=tunnel, reason=reason))
                )

    def _close_all(self, reason: str) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        log.debug("tunnels closed: %s", reason)


async def _drain(
    outbox: asyncio.Queue[fleet_pb2.MachineMessage | None],
) -> AsyncIterator[fleet_pb2.MachineMessage]:
    while (message := await outbox.get()) is not None:
        yield message
