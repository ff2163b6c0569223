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
import ctypes
import logging
import math
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.errors import BasaltError, ErrorKind

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
FLUSH_BYTES = 64 * 1024
FLUSH_SECONDS = 0.25

# linux/if_ether.h, linux/if_packet.h, asm-generic/socket.h
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP, PACKET_AUXDATA = 1, 8
PACKET_MR_PROMISC = 1
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35
# linux/if_arp.h: the hardware types with an Ethernet header on a raw socket.
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
LINKTYPE_ETHERNET = 1

PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps
_AUXDATA = struct.Struct("IIIHHHH")  # struct tpacket_auxdata
_TIMESPEC = struct.Struct("qq")

#: Captures running now, per node (its API address): the concurrency cap.
_running: dict[str, int] = {}


class CaptureLimitError(BasaltError):
    """Too many captures run on the node already; try again when one has finished."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


# -- the pcap format (pure) ---------------------------------------------------------------------


def pcap_header(snaplen: int, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    """The global header of a pcap file (little-endian, version 2.4, microseconds)."""
    return struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, snaplen, linktype)


def pcap_record(seconds: int, nanoseconds: int, data: bytes, length: int) -> bytes:
    """One record: its header (time, bytes kept, length on the wire), then the bytes."""
    return struct.pack("<IIII", seconds, nanoseconds // 1000, len(data), length) + data


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
    program: tuple[tuple[int, int, int, int], ...]


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
    indexes = {n: i for i, n in socket.if_nameindex()}
    if name not in indexes:
        known = ", ".join(sorted(indexes)) or "none"
        raise NotFoundError(
            f"interface {name!r} does not exist on this node; its interfaces: {known}",
            hint="pass one of them with -i",
        )
    try:
        hardware = int(Path(f"/sys/class/net/{name}/type").read_text().strip())
    except (OSError, ValueError):
        hardware = ARPHRD_ETHER
    return indexes[name], hardware


# -- the socket ---------------------------------------------------------------------------------


def open_capture(plan: CapturePlan) -> socket.socket:
    """The raw socket of a capture, filtered, then bound (so no unfiltered packet and no
    other interface's packet is ever queued on it)."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # receives nothing yet
    except PermissionError:
        raise BasaltError(
            "capturing needs CAP_NET_RAW, which machined on this node does not have",
            hint="run the node agent with CAP_NET_RAW (process nodes: as root)",
        ) from None
    try:
        if plan.program:
            _attach_filter(sock, plan.program)
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        if plan.promiscuous:
            membership = struct.pack("iHH8s", plan.index, PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, membership)
        sock.bind((plan.interface, ETH_P_ALL))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == 22:  # EINVAL: the kernel's verifier refused the program
            raise InvalidRequestError(
                "the kernel refused the BPF filter as invalid",
                hint="check the --bpf-raw program (tcpdump -ddd prints valid ones)",
            ) from None
        raise
    return sock


def _attach_filter(sock: socket.socket, program: tuple[tuple[int, int, int, int], ...]) -> None:
    instructions = b"".join(struct.pack("HBBI", *i) for i in program)
    buffer = ctypes.create_string_buffer(instructions, len(instructions))
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def read_ready(sock: socket.socket, plan: CapturePlan, limit: int) -> tuple[bytes, int, bool]:
    """The records of packets queued now (at most ``limit``): (records, count, drained)."""
    out = bytearray()
    count = 0
    ancillary = socket.CMSG_SPACE(_AUXDATA.size) + socket.CMSG_SPACE(_TIMESPEC.size)
    while count < limit and len(out) < FLUSH_BYTES:
        try:
            data, cmsgs, _flags, address = sock.recvmsg(plan.snaplen, ancillary)
        except BlockingIOError:
            return bytes(out), count, True
        if plan.loopback and address[2] == PACKET_OUTGOING:
            continue  # loopback: the same packet arrives as PACKET_HOST
        length, stamp = len(data), None
        for level, kind, value in cmsgs:
            if level == SOL_PACKET and kind == PACKET_AUXDATA:
                length = _AUXDATA.unpack_from(value)[1]
            elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                stamp = _TIMESPEC.unpack_from(value)
        seconds, nanoseconds = stamp or divmod(time.time_ns(), 1_000_000_000)
        out += pcap_record(seconds, nanoseconds, data, max(length, len(data)))
        count += 1
    return bytes(out), count, False


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
                records, count, drained = read_ready(sock, plan, left if left > 0 else 1 << 30)
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
