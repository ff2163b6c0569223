"""Packet capture sockets (AF_PACKET, raw) and the pcap file format.

A capture socket is opened with nothing to receive (protocol 0), gets its classic BPF
filter (SO_ATTACH_FILTER), auxiliary data (the length on the wire) and nanosecond
timestamps, optionally promiscuous membership, and only then is bound to its interface
with ETH_P_ALL: no unfiltered packet and no other interface's packet is ever queued.
Closing the socket drops the membership (and promiscuous mode) with it.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import time
from pathlib import Path

__all__ = [
    "ARPHRD_ETHER",
    "ARPHRD_LOOPBACK",
    "FLUSH_BYTES",
    "LINKTYPE_ETHERNET",
    "Program",
    "interface_info",
    "interface_names",
    "open_packet_socket",
    "pcap_header",
    "pcap_record",
    "read_ready",
]

#: A classic BPF program: (op, jt, jf, k) per instruction.
Program = tuple[tuple[int, int, int, int], ...]
#: A batch of records read at once stops at this many bytes.
FLUSH_BYTES = 64 * 1024

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


def pcap_header(snaplen: int, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    """The global header of a pcap file (little-endian, version 2.4, microseconds)."""
    return struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, snaplen, linktype)


def pcap_record(seconds: int, nanoseconds: int, data: bytes, length: int) -> bytes:
    """One record: its header (time, bytes kept, length on the wire), then the bytes."""
    return struct.pack("<IIII", seconds, nanoseconds // 1000, len(data), length) + data


def interface_info(name: str) -> tuple[int, int] | None:
    """(index, ARPHRD hardware type) of interface ``name``; None when there is none."""
    indexes = {n: i for i, n in socket.if_nameindex()}
    if name not in indexes:
        return None
    try:
        hardware = int(Path(f"/sys/class/net/{name}/type").read_text().strip())
    except (OSError, ValueError):
        hardware = ARPHRD_ETHER
    return indexes[name], hardware


def interface_names() -> list[str]:
    return sorted(n for _, n in socket.if_nameindex())


def open_packet_socket(
    interface: str, index: int, program: Program, *, promiscuous: bool
) -> socket.socket:
    """The filtered, bound, non-blocking capture socket of ``interface``. PermissionError
    without CAP_NET_RAW; OSError (EINVAL) when the kernel refuses ``program``."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # receives nothing yet
    try:
        if program:
            _attach_filter(sock, program)
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        if promiscuous:
            membership = struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, membership)
        sock.bind((interface, ETH_P_ALL))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _attach_filter(sock: socket.socket, program: Program) -> None:
    instructions = b"".join(struct.pack("HBBI", *i) for i in program)
    buffer = ctypes.create_string_buffer(instructions, len(instructions))
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def read_ready(
    sock: socket.socket, snaplen: int, loopback: bool, limit: int
) -> tuple[bytes, int, bool]:
    """The records of packets queued now (at most ``limit``): (records, count, drained)."""
    out = bytearray()
    count = 0
    ancillary = socket.CMSG_SPACE(_AUXDATA.size) + socket.CMSG_SPACE(_TIMESPEC.size)
    while count < limit and len(out) < FLUSH_BYTES:
        try:
            data, cmsgs, _flags, address = sock.recvmsg(snaplen, ancillary)
        except BlockingIOError:
            return bytes(out), count, True
        if loopback and address[2] == PACKET_OUTGOING:
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
