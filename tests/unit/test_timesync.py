"""SNTP packets, and the time sync controller against SNTP servers on loopback."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from basalt.machined.assemble import build_node
from basalt.machined.controllers.timesync import (
    RESOURCE,
    RESOURCE_ID,
    TimeSyncController,
    query,
    wait_for_sync,
)
from basalt.machined.node import Node, Tuning
from basalt.machined.platform import NodePaths, Platform, PlatformMode
from basalt.machined.platform.metal import MetalPlatform
from basalt.machined.sys.clock import ObservingClock, SystemClock
from basalt.machinery import sntp
from basalt.machinery.config import load_bundle
from tests.fakes.sntp import FakeSntpServer

API = "basalt.dev/v1alpha1"
HOST = "127.0.0.97"


class RecordingClock:
    """Reads the host's clock, records the corrections it is asked for."""

    sets = True

    def __init__(self) -> None:
        self.corrections: list[float] = []

    def now(self) -> float:
        return time.time()

    def correct(self, offset: float) -> str:
        self.corrections.append(offset)
        return "step" if abs(offset) >= 0.128 else "slew"


@pytest.fixture
def servers() -> Iterator[list[FakeSntpServer]]:
    made: list[FakeSntpServer] = []
    yield made
    for server in made:
        server.close()


def serve(servers: list[FakeSntpServer], host: str = HOST, **kwargs: object) -> FakeSntpServer:
    server = FakeSntpServer(host, **kwargs)  # type: ignore[arg-type]
    servers.append(server)
    return server


# -- packets ----------------------------------------------------------------------------------


@given(st.floats(min_value=0, max_value=2_000_000_000, allow_nan=False))
def test_ntp_timestamps_round_trip_within_a_nanosecond(unix: float) -> None:
    assert abs(sntp.from_ntp(sntp.to_ntp(unix)) - unix) < 1e-6


def test_request_is_a_version_4_client_packet_carrying_the_transmit_time() -> None:
    packet = sntp.encode_request(0x1234_5678_9ABC_DEF0)
    assert len(packet) == sntp.PACKET_SIZE
    assert packet[0] == 0x23  # leap 0, version 4, mode 3
    assert struct.unpack_from("!Q", packet, 40)[0] == 0x1234_5678_9ABC_DEF0


def _answer(first: int = 0x24, stratum: int = 2, origin: int = 77, xmit: int = 99) -> bytes:
    return struct.pack("!BBbbII4sQQQQ", first, stratum, 6, -20, 0, 0, b"RATE", 0, origin, 1, xmit)


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (_answer()[:40], "at least 48"),
        (_answer(first=0x23), "mode 3"),
        (_answer(stratum=0), "kiss code 'RATE'"),
        (_answer(first=0xE4), "not synchronised"),
        (_answer(origin=78), "not ours"),
        (_answer(xmit=0), "no transmit time"),
    ],
)
def test_bad_answers_are_refused_with_the_reason(packet: bytes, reason: str) -> None:
    with pytest.raises(sntp.SntpError, match=reason):
        sntp.decode_answer(packet, 77, time.time())


def test_offset_and_delay_follow_the_four_timestamps() -> None:
    answer = sntp.Answer(2, "x", originate=100.0, receive=110.5, transmit=110.6, arrival=100.3)
    assert answer.offset == pytest.approx(10.4)
    assert answer.delay == pytest.approx(0.2)


# -- query over loopback ----------------------------------------------------------------------


def test_query_measures_a_servers_skew(servers: list[FakeSntpServer]) -> None:
    server = serve(servers, skew=42.0)
    answer = asyncio.run(query(HOST, server.port))
    assert answer.offset == pytest.approx(42.0, abs=0.05)
    assert 0 <= answer.delay < 0.5 and answer.stratum == 2


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [("kiss", "kiss code"), ("wrong-origin", "not ours"), ("unsynced", "not synchronised")],
)
def test_query_refuses_misbehaving_servers(
    servers: list[FakeSntpServer], behaviour: str, reason: str
) -> None:
    server = serve(servers, behaviour=behaviour)
    with pytest.raises(sntp.SntpError, match=reason):
        asyncio.run(query(HOST, server.port))


def test_query_times_out_on_a_silent_server(servers: list[FakeSntpServer]) -> None:
    server = serve(servers, behaviour="silent")
    with pytest.raises(OSError, match=r"no answer within 0\.3 s"):
        asyncio.run(query(HOST, server.port, timeout=0.3))


# -- the controller ---------------------------------------------------------------------------


def _node(tmp_path: Path, port: int, *servers_: str, enabled: bool = True) -> Node:
    platform = Platform(PlatformMode.METAL, NodePaths.under(tmp_path), "127.0.0.9", "n1")
    node = build_node(platform, Tuning(ntp_port=port, time_poll_min=0.2, time_poll_max=0.4))
    listed = ", ".join(servers_)
    node.use_config(
        load_bundle(
            f"apiVersion: {API}\nkind: TimeSyncConfig\nenabled: {str(enabled).lower()}\n"
            f"servers: [{listed}]\n",
            "test",
        )
    )
    return node


def test_controller_corrects_the_clock_and_publishes_the_status(
    tmp_path: Path, servers: list[FakeSntpServer]
) -> None:
    server = serve(servers, skew=-3.0)

    async def run() -> None:
        node = _node(tmp_path, server.port, HOST)
        clock = RecordingClock()
        controller = TimeSyncController(node, clock)
        await controller.reconcile(node.store)
        await asyncio.wait_for(controller.synced.wait(), 5)
        status = node.store.get(RESOURCE, RESOURCE_ID)
        assert status is not None
        spec = status.spec
        assert spec.synced and spec.server == HOST and spec.adjustment == "step"
        assert spec.offset == pytest.approx(-3.0, abs=0.05)
        assert clock.corrections[0] == pytest.approx(-3.0, abs=0.05)
        await asyncio.sleep(0.5)  # it keeps polling
        assert server.requests >= 2

    asyncio.run(run())


def test_controller_falls_over_to_the_next_server(
    tmp_path: Path, servers: list[FakeSntpServer]
) -> None:
    kiss = serve(servers, behaviour="kiss")
    good = serve(servers, host="127.0.0.98", skew=0.01, port_wanted=kiss.port)

    async def run() -> None:
        node = _node(tmp_path, kiss.port, HOST, "127.0.0.98")
        controller = TimeSyncController(node, RecordingClock())
        settings = controller.wanted()
        assert settings is not None
        answer, server, adjustment = await controller.sync_once(settings)
        assert server == "127.0.0.98" and adjustment == "slew"
        assert answer.offset == pytest.approx(0.01, abs=0.05)
        assert kiss.requests == 1 and good.requests == 1

    asyncio.run(run())


def test_failing_servers_are_named_with_their_reasons_and_boot_does_not_wait_forever(
    tmp_path: Path, servers: list[FakeSntpServer]
) -> None:
    from basalt.machined.runtime import ControllerEngine

    kiss = serve(servers, behaviour="kiss")

    async def run() -> None:
        node = _node(tmp_path, kiss.port, HOST)
        controller = TimeSyncController(node, RecordingClock())
        node.engine = ControllerEngine(node.store, [controller])
        node.engine.start()
        assert not await wait_for_sync(node, 0.5)
        status = node.store.get(RESOURCE, RESOURCE_ID)
        assert status is not None and not status.spec.synced
        assert "127.0.0.97: server sent kiss code 'RATE'" in status.spec.error
        await node.engine.stop()

    asyncio.run(run())


def test_disabled_time_sync_asks_nobody_and_says_why(
    tmp_path: Path, servers: list[FakeSntpServer]
) -> None:
    server = serve(servers)

    async def run() -> None:
        node = _node(tmp_path, server.port, HOST, enabled=False)
        controller = TimeSyncController(node, RecordingClock())
        await controller.reconcile(node.store)
        status = node.store.get(RESOURCE, RESOURCE_ID)
        assert (
            status is not None
            and status.spec.error == "time sync is off (TimeSyncConfig.enabled is false)"
        )
        await asyncio.sleep(0.3)
        assert server.requests == 0

    asyncio.run(run())


def test_only_pid_1_on_metal_owns_the_clock(tmp_path: Path) -> None:
    container = Platform(PlatformMode.CONTAINER, NodePaths.under(tmp_path), "127.0.0.9", "n")
    assert isinstance(container.clock(), ObservingClock)
    metal = MetalPlatform.create(address="0.0.0.0", hostname="", root=tmp_path, init=False)
    assert isinstance(metal.clock(), ObservingClock) and not metal.clock().sets
    pid1 = MetalPlatform.create(address="0.0.0.0", hostname="", root=tmp_path, init=True)
    assert isinstance(pid1.clock(), SystemClock)
    assert ObservingClock().correct(5.0) == "none"
