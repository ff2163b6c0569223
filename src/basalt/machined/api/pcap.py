"""The PacketCapture RPC of MachineService (a mixin of MachineServicer).

The node opens an AF_PACKET raw socket bound to one interface, attaches the classic BPF
program the client compiled (SO_ATTACH_FILTER), and streams a pcap file as Data chunks:
the global header first, then whole records, batched (a chunk every 64 KiB or 250 ms).
It stops at the duration, the packet count, the hard limit, or when the client cancels;
the socket is always closed (which also leaves promiscuous mode).

Loopback shows every packet twice to a raw socket, once leaving (PACKET_OUTGOING) and
once arriving (PACKET_HOST); on loopback interfaces the outgoing copy is dropped, as
libpcap does, so each packet is in the file once. On other interfaces both directions
are real traffic and are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.errors import BasaltError, ErrorKind

from ..sys.packet import (
    ARPHRD_ETHER,
    ARPHRD_LOOPBACK,
    FLUSH_BYTES,
    Program,
    interface_info,
    interface_names,
    open_packet_socket,
    pcap_header,
    read_ready,
)
from .auth import current_principal
from .errors import InvalidRequestError, NotFoundError

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]

#: Captures running at once on one node, and the longest one.
MAX_CAPTURES = 2
MAX_DURATION = 3600.0
DEFAULT_SNAPLEN = 65535
MAX_SNAPLEN = 262144
MAX_INSTRUCTIONS = 4096
FLUSH_SECONDS = 0.25

#: Captures running now, per node (its API address): the concurrency cap.
_running: dict[str, int] = {}


class CaptureLimitError(BasaltError):
    """Too many captures run on the node already; try again when one has finished."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


# -- the request --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapturePlan:
    interface: str
    index: int
    loopback: bool
    snaplen: int
    duration: float  # seconds, never above MAX_DURATION
    max_packets: int  # 0: no limit
    promiscuous: bool
    program: Program


def plan_capture(request: machine_pb2.PacketCaptureRequest) -> CapturePlan:
    """The capture a request asks for, or an InvalidRequestError/NotFoundError naming
    what is wrong (nothing is opened before the request checks out)."""
    snaplen = request.snap_len or DEFAULT_SNAPLEN
    if snaplen > MAX_SNAPLEN:
        raise InvalidRequestError(
            f"snaplen {snaplen} is larger than {MAX_SNAPLEN} bytes",
            hint=f"give --snaplen from 1 to {MAX_SNAPLEN}",
        )
    duration = request.duration_seconds
    if not math.isfinite(duration) or duration < 0 or duration > MAX_DURATION:
        raise InvalidRequestError(
            f"capture duration {duration}s is out of range",
            hint=f"give a duration from 0 (until cancelled, at most {MAX_DURATION:g}s) "
            f"to {MAX_DURATION:g}s",
        )
    program = tuple((i.op, i.jt, i.jf, i.k) for i in request.bpf_filter)
    bad = [n for n, (op, jt, jf, _) in enumerate(program) if op > 0xFFFF or jt > 255 or jf > 255]
    if len(program) > MAX_INSTRUCTIONS or bad:
        raise InvalidRequestError(
            f"the BPF filter is malformed ({len(program)} instructions"
            + (f"; instruction {bad[0]} has a field out of range)" if bad else ")"),
            hint="compile it with basaltctl pcap --bpf-filter, or check the --bpf-raw program",
        )
    index, hardware = _interface(request.interface)
    if hardware not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
        raise InvalidRequestError(
            f"interface {request.interface} has hardware type {hardware}; captures support "
            "Ethernet and loopback interfaces",
            hint="capture on the Ethernet interface the traffic crosses",
        )
    return CapturePlan(
        interface=request.interface,
        index=index,
        loopback=hardware == ARPHRD_LOOPBACK,
        snaplen=snaplen,
        duration=duration or MAX_DURATION,
        max_packets=request.max_packets,
        promiscuous=request.promiscuous,
        program=program,
    )


def _interface(name: str) -> tuple[int, int]:
    """(index, ARPHRD type) of an interface; NotFoundError listing the node's interfaces."""
    found = interface_info(name)
    if found is None:
        known = ", ".join(interface_names()) or "none"
        raise NotFoundError(
            f"interface {name!r} does not exist on this node; its interfaces: {known}",
            hint="pass one of them with -i",
        )
    return found


# -- the socket ---------------------------------------------------------------------------------


def open_capture(plan: CapturePlan) -> socket.socket:
    """The raw socket of a capture (see :func:`..sys.packet.open_packet_socket`), its
    failures as errors the client can act on."""
    try:
        return open_packet_socket(
            plan.interface, plan.index, plan.program, promiscuous=plan.promiscuous
        )
    except PermissionError:
        raise BasaltError(
            "capturing needs CAP_NET_RAW, which machined on this node does not have",
            hint="run the node agent with CAP_NET_RAW (process nodes: as root)",
        ) from None
    except OSError as exc:
        if exc.errno == 22:  # EINVAL: the kernel's verifier refused the program
            raise InvalidRequestError(
                "the kernel refused the BPF filter as invalid",
                hint="check the --bpf-raw program (tcpdump -ddd prints valid ones)",
            ) from None
        raise


# -- the RPC ------------------------------------------------------------------------------------


class CaptureMethods:
    node: Node

    def meta(self) -> common_pb2.Metadata:
        raise NotImplementedError

    async def PacketCapture(
        self, request: machine_pb2.PacketCaptureRequest, context: Context
    ) -> AsyncIterator[Any]:
        who = current_principal.get().subject or "(unknown)"
        try:
            plan, sock = await self._start(request)
        except BasaltError as exc:
            log.info("packet capture by %s on %r refused: %s", who, request.interface, exc)
            raise
        key = self.node.address
        what = f"{len(plan.program)}-instruction filter" if plan.program else "no filter"
        log.info(
            "packet capture started by %s on %s (%s%s, up to %gs)",
            who,
            plan.interface,
            what,
            ", promiscuous" if plan.promiscuous else "",
            plan.duration,
        )
        packets, reason = 0, "cancelled by the client"
        try:
            meta = self.meta()
            yield common_pb2.Data(metadata=meta, bytes=pcap_header(plan.snaplen))
            async for records, count in _packets(sock, plan):
                packets += count
                if records:
                    yield common_pb2.Data(metadata=meta, bytes=records)
            reason = "done"
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException as exc:
            reason = f"failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            sock.close()
            _running[key] -= 1
            log.info(
                "packet capture by %s on %s stopped (%s): %d packets",
                who,
                plan.interface,
                reason,
                packets,
            )

    async def _start(
        self, request: machine_pb2.PacketCaptureRequest
    ) -> tuple[CapturePlan, socket.socket]:
        """The checked plan and its open socket, holding one of the node's capture slots
        (a refusal holds none)."""
        plan = plan_capture(request)
        key = self.node.address
        if _running.get(key, 0) >= MAX_CAPTURES:
            raise CaptureLimitError(
                f"{MAX_CAPTURES} packet captures already run on this node",
                hint="wait for one to finish, or cancel it",
            )
        _running[key] = _running.get(key, 0) + 1  # taken before the first await
        try:
            return plan, await asyncio.to_thread(open_capture, plan)
        except BaseException:
            _running[key] -= 1
            raise


async def _packets(sock: socket.socket, plan: CapturePlan) -> AsyncIterator[tuple[bytes, int]]:
    """Batches of records until the duration or the packet count is reached."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(sock.fileno(), readable.set)
    deadline = loop.time() + plan.duration
    left = plan.max_packets or -1
    pending, pending_count, since = bytearray(), 0, loop.time()
    try:
        while left != 0:
            now = loop.time()
            if now >= deadline:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(readable.wait(), min(FLUSH_SECONDS, deadline - now))
            readable.clear()
            drained = False
            while not drained and left != 0:
                records, count, drained = read_ready(
                    sock, plan.snaplen, plan.loopback, left if left > 0 else 1 << 30
                )
                if count and not pending:
                    since = loop.time()
                pending += records
                pending_count += count
                left = left - count if left > 0 else left
                if len(pending) >= FLUSH_BYTES:
                    break
            if pending and (len(pending) >= FLUSH_BYTES or loop.time() - since >= FLUSH_SECONDS):
                yield bytes(pending), pending_count
                pending, pending_count = bytearray(), 0
        yield bytes(pending), pending_count
    finally:
        loop.remove_reader(sock.fileno())
