"""Time sync: TimeSyncConfig -> SNTP queries -> the clock, and TimeStatuses/node.

A background loop asks the configured servers in turn (the first valid answer wins; an
answer that fails the checks in :mod:`basalt.machinery.sntp` is reported and the next
server is asked), corrects the clock by the offset (step at 128 ms or more, slew below)
and publishes what it did. Until the first sync it retries quickly (1 s, doubling to
the poll interval); once in sync it polls every ``poll_min`` seconds, doubling up to
``poll_max`` while the clock stays within 50 ms.

Only PID 1 on metal owns the clock. Elsewhere (container mode, a test running the metal
platform unprivileged) the loop still measures and reports the offset with adjustment
``none``. Without a TimeSyncConfig, or with ``enabled: false``, nothing is asked and the
status says so.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from basalt.machinery import sntp
from basalt.machinery.resources import TimeStatusSpec

from ..runtime import Controller, ResourceStore
from ..sys.clock import Clock, ObservingClock

if TYPE_CHECKING:
    from basalt.machinery.config import TimeSyncConfig

    from ..node import Node

log = logging.getLogger(__name__)

RESOURCE = "TimeStatuses"
RESOURCE_ID = "node"
#: Below this offset the clock counts as steady and the poll interval grows.
STEADY_OFFSET = 0.05


@dataclass(frozen=True)
class Settings:
    servers: tuple[str, ...]
    port: int


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[tuple[bytes, float]] = (
            asyncio.get_running_loop().create_future()
        )
        self.clock: Clock = ObservingClock()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.answer.done():
            self.answer.set_result((data, self.clock.now()))

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def query(
    server: str, port: int = sntp.NTP_PORT, *, clock: Clock | None = None, timeout: float = 2.0
) -> sntp.Answer:
    """One SNTP exchange with ``server``; raises :class:`sntp.SntpError` or OSError."""
    clock = clock or ObservingClock()
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(server, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"{server}: no address")
    family, _, _, _, address = infos[0]
    host, service = str(address[0]), int(address[1])
    transport, protocol = await loop.create_datagram_endpoint(
        _Exchange, remote_addr=(host, service), family=family
    )
    try:
        protocol.clock = clock
        # The low bits of the fraction are below the clock's resolution: randomising
        # them makes the originate check also a nonce.
        sent = sntp.to_ntp(clock.now()) ^ random.getrandbits(8)
        transport.sendto(sntp.encode_request(sent))
        try:
            data, arrival = await asyncio.wait_for(protocol.answer, timeout)
        except TimeoutError:
            raise OSError(f"no answer within {timeout:g} s") from None
        return sntp.decode_answer(data, sent, arrival)
    finally:
        transport.close()


class TimeSyncController(Controller):
    name = "timesync"
    inputs = ("MachineConfigs",)
    outputs = (RESOURCE,)

    def __init__(self, node: Node, clock: Clock | None = None) -> None:
        self.node = node
        self.clock: Clock = clock or node.platform.clock()
        self.synced = asyncio.Event()
        self._settings: Settings | bool | None = False  # False: nothing decided yet
        self._loop: asyncio.Task[None] | None = None

    def document(self) -> TimeSyncConfig | None:
        if self.node.config is None:
            return None
        from basalt.machinery.config import TimeSyncConfig

        return self.node.config.first(TimeSyncConfig)

    def wanted(self) -> Settings | None:
        config = self.document()
        if config is None or not config.enabled or not config.servers:
            return None
        return Settings(tuple(config.servers), self.node.tuning.ntp_port)

    async def reconcile(self, store: ResourceStore) -> None:
        settings = self.wanted()
        if settings == self._settings:
            return
        if self._loop is not None:
            self._loop.cancel()
            self._loop = None
        self._settings = settings
        if settings is None:
            self.synced.clear()
            config = self.document()
            if self.node.config is None:
                why = "no config yet"
            elif config is None:
                why = "no TimeSyncConfig"
            else:
                why = "TimeSyncConfig.enabled is false"
            store.put(
                RESOURCE,
                RESOURCE_ID,
                TimeStatusSpec(synced=False, servers=[], error=f"time sync is off ({why})"),
                owner=self.name,
            )
            return
        self._loop = self.node.background(self._sync_forever(store, settings), name="timesync")

    async def sync_once(self, settings: Settings) -> tuple[sntp.Answer, str, str]:
        """Ask each server in turn; returns (answer, server, adjustment)."""
        reasons = []
        for server in settings.servers:
            try:
                answer = await query(server, settings.port, clock=self.clock)
            except (OSError, sntp.SntpError) as exc:
                reasons.append(f"{server}: {exc}")
                continue
            adjustment = await asyncio.to_thread(self.clock.correct, answer.offset)
            return answer, server, adjustment
        raise sntp.SntpError("; ".join(reasons))

    async def _sync_forever(self, store: ResourceStore, settings: Settings) -> None:
        tuning = self.node.tuning
        retry = 1.0
        poll = tuning.time_poll_min
        last: TimeStatusSpec | None = None
        while True:
            try:
                answer, server, adjustment = await self.sync_once(settings)
            except sntp.SntpError as exc:
                log.warning("time sync failed: %s", exc)
                status = TimeStatusSpec(
                    synced=last is not None and last.synced,
                    servers=list(settings.servers),
                    server=last.server if last else "",
                    last_sync=last.last_sync if last else 0.0,
                    error=str(exc),
                )
                store.put(RESOURCE, RESOURCE_ID, status, owner=self.name)
                await asyncio.sleep(retry if last is None else poll)
                retry = min(retry * 2, tuning.time_poll_min)
                continue
            if last is None or not last.synced:
                self.node.events.publish(
                    "time",
                    f"clock in sync with {server} (offset {answer.offset:+.3f} s, {adjustment})",
                    actor="timesync",
                )
            last = TimeStatusSpec(
                synced=True,
                servers=list(settings.servers),
                server=server,
                stratum=answer.stratum,
                offset=answer.offset,
                delay=answer.delay,
                adjustment=adjustment,
                last_sync=self.clock.now(),
            )
            store.put(RESOURCE, RESOURCE_ID, last, owner=self.name)
            self.synced.set()
            steady = abs(answer.offset) < STEADY_OFFSET
            poll = min(poll * 2, tuning.time_poll_max) if steady else tuning.time_poll_min
            await asyncio.sleep(poll)


async def wait_for_sync(node: Node, timeout: float) -> bool:
    """Until the clock is in sync or ``timeout`` passes; True when in sync."""
    engine = node.engine
    controller = next(
        (c for c in (engine.controllers if engine else []) if isinstance(c, TimeSyncController)),
        None,
    )
    if controller is None or controller.wanted() is None:
        return True
    try:
        await asyncio.wait_for(controller.synced.wait(), timeout)
    except TimeoutError:
        return False
    return True
