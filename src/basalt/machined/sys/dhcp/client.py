"""A DHCPv4 client (RFC 2131): DISCOVER, OFFER, REQUEST, ACK; renewal at T1, rebinding at T2.

Without an address the client cannot use a UDP socket, so until it is bound it speaks
through a packet socket on the link (AF_PACKET, the kernel adds the Ethernet header)
with a BPF filter that passes only UDP to port 68; it builds the IPv4 and UDP headers
itself. Renewing and rebinding, when the leased address is configured, go through an
ordinary UDP socket bound to the link.

The client only speaks DHCP: what a lease means for the link (address, routes,
resolvers) is up to the ``on_bound`` / ``on_lost`` callbacks. Packet encoding and
decoding are pure functions, tested without a network.

Not done: ARP probing of the offered address (DECLINE), INIT-REBOOT, RELEASE on stop,
FORCERENEW, DHCPv6.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from .packet import (
    ANY,
    BROADCAST,
    CLIENT_PORT,
    ETH_P_IP,
    SERVER_PORT,
    DhcpDecodeError,
    DhcpMessage,
    Lease,
    MessageType,
    Option,
    build_ipv4_udp,
    discover,
    mac_bytes,
    parse_ipv4_udp,
    request,
    text_option,
)

__all__ = ["DhcpClient", "DhcpTiming"]

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = 26

#: Classic BPF, from the IPv4 header on (SOCK_DGRAM): UDP, not a fragment, to port 68.
_BPF_PROGRAM = (
    (0x30, 0, 0, 9),  # ldb [9]            protocol
    (0x15, 0, 6, socket.IPPROTO_UDP),  # jeq #17
    (0x28, 0, 0, 6),  # ldh [6]            flags + fragment offset
    (0x45, 4, 0, 0x1FFF),  # jset #0x1fff  -> drop
    (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf)   header length
    (0x48, 0, 0, 2),  # ldh [x+2]          destination port
    (0x15, 0, 1, CLIENT_PORT),  # jeq #68
    (0x06, 0, 0, 0x40000),  # accept
    (0x06, 0, 0, 0),  # drop
)


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


def _attach_filter(sock: socket.socket) -> None:
    program = (_SockFilter * len(_BPF_PROGRAM))(*(_SockFilter(*i) for i in _BPF_PROGRAM))
    fprog = struct.pack("HL", len(_BPF_PROGRAM), ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# -- the client -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DhcpTiming:
    """Retransmission timing; tests shorten it."""

    #: Waits between DISCOVERs (the last repeats); RFC 2131 suggests 4, 8, 16, ... 64.
    discover: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    #: Waits between REQUESTs for an offer before starting over with a DISCOVER.
    request: tuple[float, ...] = (2.0, 4.0, 8.0)
    #: Shortest wait between renewal attempts (RFC 2131: 60 s).
    min_renew_retry: float = 60.0
    #: Random +- spread on each wait.
    jitter: float = 0.5
    #: Pause after a NAK or a failed callback before starting over.
    restart_delay: float = 1.0


LeaseCallback = Callable[["Lease"], Awaitable[None]]


class _Link:
    """Sends and receives DHCP on one link: a packet socket, or UDP once bound."""

    def __init__(self, ifname: str, bound: bool) -> None:
        self.ifname = ifname
        self.bound = bound
        if bound:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            sock.bind(("0.0.0.0", CLIENT_PORT))
        else:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
            _attach_filter(sock)
            sock.bind((ifname, ETH_P_IP))
        sock.setblocking(False)
        self.sock = sock

    def close(self) -> None:
        self.sock.close()

    async def send(self, message: DhcpMessage, dst: IPv4Address, src: IPv4Address = ANY) -> None:
        loop = asyncio.get_running_loop()
        payload = message.encode()
        if self.bound:
            await loop.sock_sendto(self.sock, payload, (str(dst), SERVER_PORT))
        else:
            packet = build_ipv4_udp(src, dst, CLIENT_PORT, SERVER_PORT, payload)
            address = (self.ifname, ETH_P_IP, 0, 0, b"\xff" * 6)
            await loop.sock_sendto(self.sock, packet, address)

    async def receive(self) -> tuple[DhcpMessage, IPv4Address | None]:
        """The next DHCP reply on the link, with the address it came from."""
        loop = asyncio.get_running_loop()
        while True:
            data, source = await loop.sock_recvfrom(self.sock, 4096)
            sender: IPv4Address | None
            if self.bound:
                payload, sender = data, IPv4Address(source[0])
            else:
                parsed = parse_ipv4_udp(data)
                if parsed is None or parsed[3] != CLIENT_PORT or parsed[1] != SERVER_PORT:
                    continue
                sender, payload = parsed[0], parsed[4]
            try:
                message = DhcpMessage.decode(payload)
            except DhcpDecodeError as exc:
                log.debug("%s: ignoring a malformed DHCP packet: %s", self.ifname, exc)
                continue
            if message.op == 2:
                return message, sender


class DhcpClient:
    """Keeps a DHCPv4 lease on one link for as long as :meth:`run` runs."""

    def __init__(
        self,
        ifname: str,
        mac: str,
        *,
        hostname: str | None = None,
        timing: DhcpTiming | None = None,
    ) -> None:
        self.ifname = ifname
        self.mac = mac
        self._chaddr = mac_bytes(mac)
        self.hostname = hostname
        self.timing = timing or DhcpTiming()
        self.state = "init"
        self.lease: Lease | None = None

    def _wait(self, base: float) -> float:
        spread = self.timing.jitter
        return max(0.1, base + random.uniform(-spread, spread))

    def _ours(self, message: DhcpMessage, xid: int) -> bool:
        return message.xid == xid and message.chaddr == self._chaddr

    async def _exchange(
        self,
        link: _Link,
        build: Callable[[int], DhcpMessage],
        dst: IPv4Address,
        waits: Callable[[int], float | None],
        accept: Callable[[DhcpMessage], bool],
        src: IPv4Address = ANY,
    ) -> tuple[DhcpMessage, IPv4Address | None] | None:
        """Send ``build(secs)`` until a reply ``accept`` takes; None when ``waits`` ends."""
        started = time.monotonic()
        attempt = 0
        while (wait := waits(attempt)) is not None:
            try:
                await link.send(build(int(time.monotonic() - started)), dst, src)
            except OSError as exc:  # e.g. the link is down: like a lost packet
                log.debug("%s: sending DHCP failed: %s", self.ifname, exc)
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                try:
                    reply, sender = await asyncio.wait_for(link.receive(), left)
                except TimeoutError:
                    break
                if accept(reply):
                    return reply, sender
            attempt += 1
        return None

    async def acquire(self, hint: IPv4Address | None = None) -> Lease:
        """INIT -> SELECTING -> REQUESTING -> BOUND; retries until it has a lease."""
        while True:
            xid = random.getrandbits(32)
            link = _Link(self.ifname, bound=False)
            try:
                offer = await self._select(link, xid, hint)
                answer = await self._request(link, xid, offer)
            finally:
                link.close()
            if answer is None:
                log.info("%s: no answer to DHCPREQUEST; discovering again", self.ifname)
                continue
            reply, sender = answer
            if reply.type is MessageType.NAK:
                log.info(
                    "%s: DHCPNAK: %s", self.ifname, text_option(reply.options.get(Option.MESSAGE))
                )
                await asyncio.sleep(self._wait(self.timing.restart_delay))
                continue
            return Lease.from_ack(reply, time.monotonic(), sender)

    async def _select(self, link: _Link, xid: int, hint: IPv4Address | None) -> DhcpMessage:
        """SELECTING: DISCOVER until an offer comes (the first one is taken)."""
        self.state = "selecting"
        waits = self.timing.discover
        got = await self._exchange(
            link,
            lambda secs: discover(xid, self.mac, hostname=self.hostname, secs=secs, hint=hint),
            BROADCAST,
            lambda n: self._wait(waits[min(n, len(waits) - 1)]),
            lambda m: self._ours(m, xid) and m.type is MessageType.OFFER,
        )
        assert got is not None  # discovery never gives up
        offer, offered_by = got
        log.info("%s: DHCP offer of %s from %s", self.ifname, offer.yiaddr, offered_by or "?")
        return offer

    async def _request(
        self, link: _Link, xid: int, offer: DhcpMessage
    ) -> tuple[DhcpMessage, IPv4Address | None] | None:
        """REQUESTING: ask for the offered address; an ACK, a NAK, or None (no answer)."""
        self.state = "requesting"
        waits = self.timing.request
        return await self._exchange(
            link,
            lambda secs: request(xid, self.mac, offer=offer, hostname=self.hostname, secs=secs),
            BROADCAST,
            lambda n: self._wait(waits[n]) if n < len(waits) else None,
            lambda m: self._ours(m, xid) and m.type in (MessageType.ACK, MessageType.NAK),
        )

    async def extend(self, lease: Lease) -> Lease | None:
        """RENEWING (unicast to the server) from T1, then REBINDING (broadcast) from T2.

        Returns the extended lease, or None on a NAK or when the lease ran out.
        """
        xid = random.getrandbits(32)
        link = _Link(self.ifname, bound=True)
        try:
            for state, dst, until in (
                ("renewing", lease.server, lease.rebind_at),
                ("rebinding", BROADCAST, lease.expires_at),
            ):
                if time.monotonic() >= until:
                    continue
                self.state = state

                def waits(_: int, until: float = until) -> float | None:
                    left = until - time.monotonic()
                    if left <= 0:
                        return None
                    return min(left, max(self.timing.min_renew_retry, left / 2))

                answer = await self._exchange(
                    link,
                    lambda secs: request(
                        xid,
                        self.mac,
                        ciaddr=lease.address.ip,
                        hostname=self.hostname,
                        secs=secs,
                    ),
                    dst,
                    waits,
                    lambda m: self._ours(m, xid) and m.type in (MessageType.ACK, MessageType.NAK),
                )
                if answer is None:
                    continue
                reply, sender = answer
                if reply.type is MessageType.NAK:
                    log.info("%s: DHCPNAK while %s", self.ifname, state)
                    return None
                renewed = Lease.from_ack(reply, time.monotonic(), sender)
                if renewed.server == ANY:
                    renewed = replace(renewed, server=lease.server)
                return renewed
        finally:
            link.close()
        return None

    async def run(self, on_bound: LeaseCallback, on_lost: LeaseCallback) -> None:
        """Acquire a lease and keep it; never returns (cancel the task to stop)."""
        hint: IPv4Address | None = None
        while True:
            try:
                lease: Lease | None = await self.acquire(hint)
            except OSError as exc:  # the link went away, or cannot be opened yet
                log.warning("%s: DHCP cannot run: %s; retrying", self.ifname, exc)
                await asyncio.sleep(self._wait(max(self.timing.restart_delay, 5.0)))
                continue
            while lease is not None:
                self.lease, self.state = lease, "bound"
                log.info(
                    "%s: DHCP lease %s from %s for %s s (renewal in %s s)",
                    self.ifname,
                    lease.address,
                    lease.server,
                    "infinite" if lease.infinite else lease.lease_time,
                    lease.renewal_time,
                )
                try:
                    await on_bound(lease)
                except Exception as exc:
                    log.warning("%s: applying the DHCP lease failed: %s", self.ifname, exc)
                    with contextlib.suppress(Exception):
                        await on_lost(lease)
                    self.lease = None
                    await asyncio.sleep(self._wait(self.timing.restart_delay))
                    break
                if lease.infinite:
                    await asyncio.Event().wait()
                await asyncio.sleep(max(0.0, lease.renew_at - time.monotonic()))
                try:
                    renewed = await self.extend(lease)
                except OSError as exc:
                    log.warning("%s: renewing the DHCP lease failed: %s", self.ifname, exc)
                    renewed = None
                if renewed is None or renewed.address != lease.address:
                    log.info("%s: DHCP lease %s lost", self.ifname, lease.address)
                    await on_lost(lease)
                    self.lease = None
                    hint = lease.address.ip if renewed is None else None
                lease = renewed
            self.state = "init"
