"""DHCPv4 messages, options and leases (RFC 2131, 2132, 3396, 3397, 3442), and the IPv4/UDP
framing the packet socket needs: pure functions, tested without a network."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from basalt.machinery.errors import BasaltError

__all__ = [
    "ANY",
    "BROADCAST",
    "INFINITE",
    "PARAMETERS",
    "DhcpDecodeError",
    "DhcpMessage",
    "Lease",
    "MessageType",
    "Option",
    "build_ipv4_udp",
    "decode_classless_routes",
    "decode_domain_search",
    "decode_options",
    "discover",
    "encode_options",
    "mac_bytes",
    "parse_ipv4_udp",
    "request",
    "text_option",
]

SERVER_PORT = 67
CLIENT_PORT = 68
MAGIC_COOKIE = 0x63825363
BROADCAST = IPv4Address("255.255.255.255")
ANY = IPv4Address("0.0.0.0")
INFINITE = 0xFFFFFFFF
ETH_P_IP = 0x0800
_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128sI")  # BOOTP + magic cookie
_MIN_BOOTP = 300  # BOOTP's minimum message size; some servers drop shorter ones


class MessageType(IntEnum):
    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Option(IntEnum):
    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS_SERVERS = 6
    HOSTNAME = 12
    DOMAIN_NAME = 15
    MTU = 26
    BROADCAST = 28
    NTP_SERVERS = 42
    REQUESTED_ADDRESS = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAMETERS = 55
    MESSAGE = 56
    MAX_SIZE = 57
    RENEWAL_TIME = 58
    REBINDING_TIME = 59
    CLIENT_ID = 61
    DOMAIN_SEARCH = 119
    CLASSLESS_ROUTES = 121
    END = 255


#: What the client asks servers for.
PARAMETERS = bytes(
    [
        Option.SUBNET_MASK,
        Option.ROUTER,
        Option.DNS_SERVERS,
        Option.HOSTNAME,
        Option.DOMAIN_NAME,
        Option.MTU,
        Option.BROADCAST,
        Option.NTP_SERVERS,
        Option.LEASE_TIME,
        Option.RENEWAL_TIME,
        Option.REBINDING_TIME,
        Option.DOMAIN_SEARCH,
        Option.CLASSLESS_ROUTES,
    ]
)


class DhcpDecodeError(BasaltError):
    """A packet is not a well-formed DHCP message (it is ignored)."""


# -- messages -------------------------------------------------------------------------------


def mac_bytes(mac: str) -> bytes:
    """``"52:54:00:12:34:56"`` -> 6 bytes."""
    raw = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"{mac!r} is not an Ethernet address")
    return raw


def encode_options(options: dict[int, bytes]) -> bytes:
    """Options in order, long ones split (RFC 3396), then END."""
    out = bytearray()
    for code, value in options.items():
        chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [b""]
        for chunk in chunks:
            out += bytes([code, len(chunk)]) + chunk
    out.append(Option.END)
    return bytes(out)


def decode_options(data: bytes, into: dict[int, bytes] | None = None) -> dict[int, bytes]:
    """Options until END; repeated codes are concatenated (RFC 3396)."""
    options = into if into is not None else {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == Option.PAD:
            i += 1
            continue
        if code == Option.END:
            break
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            raise DhcpDecodeError(f"option {code} runs past the end of the message")
        length = data[i + 1]
        options[code] = options.get(code, b"") + data[i + 2 : i + 2 + length]
        i += 2 + length
    return options


@dataclass(frozen=True)
class DhcpMessage:
    """One BOOTP/DHCP message; ``options`` maps option codes to raw values."""

    op: int
    xid: int
    chaddr: bytes
    options: dict[int, bytes] = field(default_factory=dict)
    secs: int = 0
    flags: int = 0
    ciaddr: IPv4Address = ANY
    yiaddr: IPv4Address = ANY
    siaddr: IPv4Address = ANY
    giaddr: IPv4Address = ANY

    @property
    def type(self) -> MessageType | None:
        raw = self.options.get(Option.MESSAGE_TYPE, b"")
        try:
            return MessageType(raw[0]) if len(raw) == 1 else None
        except ValueError:
            return None

    def encode(self) -> bytes:
        header = _HEADER.pack(
            self.op,
            1,  # Ethernet
            6,
            0,
            self.xid,
            self.secs,
            self.flags,
            self.ciaddr.packed,
            self.yiaddr.packed,
            self.siaddr.packed,
            self.giaddr.packed,
            self.chaddr.ljust(16, b"\0"),
            b"",
            b"",
            MAGIC_COOKIE,
        )
        packet = header + encode_options(self.options)
        return packet.ljust(_MIN_BOOTP, b"\0")

    @classmethod
    def decode(cls, data: bytes) -> DhcpMessage:
        if len(data) < _HEADER.size:
            raise DhcpDecodeError(f"{len(data)} bytes is too short for a DHCP message")
        fields = _HEADER.unpack_from(data)
        op, htype, hlen, _, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file, cookie = fields
        if cookie != MAGIC_COOKIE:
            raise DhcpDecodeError("no DHCP magic cookie (a plain BOOTP message?)")
        if op not in (1, 2) or htype != 1 or hlen != 6:
            raise DhcpDecodeError(f"not an Ethernet DHCP message (op {op}, htype {htype})")
        options = decode_options(data[_HEADER.size :])
        overload = options.pop(Option.OVERLOAD, b"\0")[:1]
        if overload in (b"\x01", b"\x03"):
            decode_options(file, options)
        if overload in (b"\x02", b"\x03"):
            decode_options(sname, options)
        return cls(
            op=op,
            xid=xid,
            chaddr=chaddr[:6],
            options=options,
            secs=secs,
            flags=flags,
            ciaddr=IPv4Address(ci),
            yiaddr=IPv4Address(yi),
            siaddr=IPv4Address(si),
            giaddr=IPv4Address(gi),
        )


def _client_options(kind: MessageType, mac: bytes, hostname: str | None) -> dict[int, bytes]:
    options: dict[int, bytes] = {
        Option.MESSAGE_TYPE: bytes([kind]),
        Option.CLIENT_ID: b"\x01" + mac,
    }
    if kind in (MessageType.DISCOVER, MessageType.REQUEST):
        options[Option.PARAMETERS] = PARAMETERS
        options[Option.MAX_SIZE] = struct.pack("!H", 1500)
        if hostname:
            options[Option.HOSTNAME] = hostname.encode()[:255]
    return options


def discover(
    xid: int,
    mac: str,
    *,
    hostname: str | None = None,
    secs: int = 0,
    hint: IPv4Address | None = None,
) -> DhcpMessage:
    """DHCPDISCOVER; ``hint`` asks for the address the client had before."""
    raw = mac_bytes(mac)
    options = _client_options(MessageType.DISCOVER, raw, hostname)
    if hint is not None:
        options[Option.REQUESTED_ADDRESS] = hint.packed
    return DhcpMessage(op=1, xid=xid, chaddr=raw, options=options, secs=min(secs, 0xFFFF))


def request(
    xid: int,
    mac: str,
    *,
    offer: DhcpMessage | None = None,
    ciaddr: IPv4Address = ANY,
    hostname: str | None = None,
    secs: int = 0,
) -> DhcpMessage:
    """DHCPREQUEST: answering ``offer`` (SELECTING), or renewing/rebinding ``ciaddr``."""
    raw = mac_bytes(mac)
    options = _client_options(MessageType.REQUEST, raw, hostname)
    if offer is not None:
        options[Option.REQUESTED_ADDRESS] = offer.yiaddr.packed
        options[Option.SERVER_ID] = offer.options.get(Option.SERVER_ID, offer.siaddr.packed)
    return DhcpMessage(
        op=1, xid=xid, chaddr=raw, options=options, secs=min(secs, 0xFFFF), ciaddr=ciaddr
    )


# -- leases ---------------------------------------------------------------------------------


def _addresses(raw: bytes) -> tuple[IPv4Address, ...]:
    return tuple(IPv4Address(raw[i : i + 4]) for i in range(0, len(raw) - len(raw) % 4, 4))


def _u32(raw: bytes | None) -> int | None:
    return struct.unpack("!I", raw)[0] if raw is not None and len(raw) == 4 else None


def decode_classless_routes(raw: bytes) -> tuple[tuple[IPv4Network, IPv4Address], ...]:
    """Option 121 (RFC 3442): width, significant octets of the network, gateway."""
    routes = []
    i = 0
    while i < len(raw):
        width = raw[i]
        octets = (width + 7) // 8
        if width > 32 or i + 1 + octets + 4 > len(raw):
            raise DhcpDecodeError("malformed classless static route option")
        network = IPv4Network((raw[i + 1 : i + 1 + octets].ljust(4, b"\0"), width), strict=False)
        gateway = IPv4Address(raw[i + 1 + octets : i + 5 + octets])
        routes.append((network, gateway))
        i += 5 + octets
    return tuple(routes)


def decode_domain_search(raw: bytes) -> tuple[str, ...]:
    """Option 119 (RFC 3397): DNS names, with compression pointers into the option."""
    names = []
    i = 0
    while i < len(raw):
        labels: list[str] = []
        j, jumps, end = i, 0, None
        while True:
            if j >= len(raw):
                raise DhcpDecodeError("malformed domain search option")
            length = raw[j]
            if length == 0:
                end = end if end is not None else j + 1
                break
            if length & 0xC0 == 0xC0:
                if j + 1 >= len(raw) or jumps > 16:
                    raise DhcpDecodeError("malformed domain search option")
                end = end if end is not None else j + 2
                j = ((length & 0x3F) << 8) | raw[j + 1]
                jumps += 1
                continue
            labels.append(raw[j + 1 : j + 1 + length].decode("ascii", errors="replace"))
            j += 1 + length
        names.append(".".join(labels))
        i = end
    return tuple(n for n in names if n)


@dataclass(frozen=True)
class Lease:
    """What a DHCPACK granted; times are in seconds, ``acquired`` on the monotonic clock."""

    address: IPv4Interface
    server: IPv4Address
    lease_time: int
    renewal_time: int
    rebinding_time: int
    acquired: float
    routers: tuple[IPv4Address, ...] = ()
    classless_routes: tuple[tuple[IPv4Network, IPv4Address], ...] = ()
    dns_servers: tuple[IPv4Address, ...] = ()
    domain: str | None = None
    search: tuple[str, ...] = ()
    ntp_servers: tuple[IPv4Address, ...] = ()
    hostname: str | None = None
    mtu: int | None = None

    @classmethod
    def from_ack(cls, ack: DhcpMessage, now: float, server: IPv4Address | None = None) -> Lease:
        options = ack.options
        mask = options.get(Option.SUBNET_MASK)
        if mask is not None and len(mask) == 4:
            try:
                prefix = IPv4Network(f"0.0.0.0/{IPv4Address(mask)}").prefixlen
            except ValueError:
                raise DhcpDecodeError(f"subnet mask {IPv4Address(mask)} is not a netmask") from None
        else:  # no mask: the address class decides, as before CIDR
            first = ack.yiaddr.packed[0]
            prefix = 8 if first < 128 else 16 if first < 192 else 24
        lease_time = _u32(options.get(Option.LEASE_TIME)) or INFINITE
        t2 = _u32(options.get(Option.REBINDING_TIME)) or int(lease_time * 0.875)
        t1 = _u32(options.get(Option.RENEWAL_TIME)) or int(lease_time * 0.5)
        t2 = min(t2, lease_time)
        t1 = min(t1, t2)
        server_id = options.get(Option.SERVER_ID)
        mtu_raw = options.get(Option.MTU)
        mtu = struct.unpack("!H", mtu_raw)[0] if mtu_raw and len(mtu_raw) == 2 else None
        return cls(
            address=IPv4Interface((ack.yiaddr, prefix)),
            server=IPv4Address(server_id) if server_id and len(server_id) == 4 else server or ANY,
            lease_time=lease_time,
            renewal_time=t1,
            rebinding_time=t2,
            acquired=now,
            routers=_addresses(options.get(Option.ROUTER, b"")),
            classless_routes=decode_classless_routes(options.get(Option.CLASSLESS_ROUTES, b"")),
            dns_servers=_addresses(options.get(Option.DNS_SERVERS, b"")),
            domain=text_option(options.get(Option.DOMAIN_NAME)),
            search=decode_domain_search(options.get(Option.DOMAIN_SEARCH, b"")),
            ntp_servers=_addresses(options.get(Option.NTP_SERVERS, b"")),
            hostname=text_option(options.get(Option.HOSTNAME)),
            mtu=mtu if mtu is None or mtu >= 68 else None,
        )

    @property
    def infinite(self) -> bool:
        return self.lease_time == INFINITE

    @property
    def renew_at(self) -> float:
        return self.acquired + self.renewal_time

    @property
    def rebind_at(self) -> float:
        return self.acquired + self.rebinding_time

    @property
    def expires_at(self) -> float:
        return self.acquired + self.lease_time

    def remaining(self, now: float) -> int:
        """Seconds of validity left (for the kernel's address lifetime)."""
        return INFINITE if self.infinite else max(0, int(self.expires_at - now))

    def routes(self) -> tuple[tuple[IPv4Network, IPv4Address], ...]:
        """Routes to install: classless routes win over routers (RFC 3442)."""
        if self.classless_routes:
            return self.classless_routes
        if self.routers:
            return ((IPv4Network("0.0.0.0/0"), self.routers[0]),)
        return ()


def text_option(raw: bytes | None) -> str | None:
    """A text option (host name, domain, message), without trailing NULs."""
    if not raw:
        return None
    return raw.rstrip(b"\0").decode("ascii", errors="replace") or None


# -- IPv4 and UDP framing (for the packet socket) ---------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_ipv4_udp(
    src: IPv4Address, dst: IPv4Address, sport: int, dport: int, payload: bytes
) -> bytes:
    """An IPv4 packet holding one UDP datagram, with both checksums."""
    udp_length = 8 + len(payload)
    pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_length)
    udp = struct.pack("!HHHH", sport, dport, udp_length, 0) + payload
    udp_sum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", udp_sum) + udp[8:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0x10,  # low delay, as other DHCP clients send
        20 + udp_length,
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        src.packed,
        dst.packed,
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def parse_ipv4_udp(packet: bytes) -> tuple[IPv4Address, int, IPv4Address, int, bytes] | None:
    """(source, source port, destination, destination port, payload), or None."""
    if len(packet) < 28 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    if packet[9] != socket.IPPROTO_UDP or ihl < 20 or total > len(packet) or total < ihl + 8:
        return None
    if struct.unpack_from("!H", packet, 6)[0] & 0x3FFF:
        return None  # a fragment
    sport, dport, length = struct.unpack_from("!HHH", packet, ihl)
    if length < 8 or ihl + length > total:
        return None
    src, dst = IPv4Address(packet[12:16]), IPv4Address(packet[16:20])
    return src, sport, dst, dport, packet[ihl + 8 : ihl + length]
