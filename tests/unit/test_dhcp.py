"""DHCPv4 packets: encoding, decoding, leases and IPv4/UDP framing (no network)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from basalt.machined.sys.dhcp import (
    DhcpDecodeError,
    DhcpMessage,
    Lease,
    MessageType,
    Option,
    build_ipv4_udp,
    discover,
    parse_ipv4_udp,
    request,
)
from basalt.machined.sys.dhcp.client import _BPF_PROGRAM
from basalt.machined.sys.dhcp.packet import (
    INFINITE,
    PARAMETERS,
    decode_classless_routes,
    decode_domain_search,
    decode_options,
    encode_options,
)

MAC = "52:54:00:12:34:56"


def ack(**options: bytes) -> DhcpMessage:
    base: dict[int, bytes] = {Option.MESSAGE_TYPE: bytes([MessageType.ACK])}
    base.update({Option[k.upper()]: v for k, v in options.items()})
    return DhcpMessage(
        op=2,
        xid=7,
        chaddr=bytes.fromhex("525400123456"),
        options=base,
        yiaddr=IPv4Address("10.0.2.15"),
        siaddr=IPv4Address("10.0.2.2"),
    )


def test_discover_round_trips_and_asks_for_what_a_node_needs() -> None:
    message = discover(0xDEADBEEF, MAC, hostname="cp-1", secs=3)
    raw = message.encode()
    assert len(raw) >= 300  # BOOTP minimum
    assert raw[236:240] == b"\x63\x82\x53\x63"
    back = DhcpMessage.decode(raw)
    assert back == message
    assert back.type is MessageType.DISCOVER
    assert back.chaddr == bytes.fromhex("525400123456")
    assert back.options[Option.CLIENT_ID] == b"\x01" + back.chaddr
    assert back.options[Option.HOSTNAME] == b"cp-1"
    wanted = back.options[Option.PARAMETERS]
    assert wanted == PARAMETERS
    for option in (Option.SUBNET_MASK, Option.ROUTER, Option.DNS_SERVERS, Option.NTP_SERVERS):
        assert option in wanted


def test_discover_can_hint_the_previous_address() -> None:
    hinted = discover(1, MAC, hint=IPv4Address("10.0.2.15"))
    assert hinted.options[Option.REQUESTED_ADDRESS] == IPv4Address("10.0.2.15").packed
    assert Option.REQUESTED_ADDRESS not in discover(1, MAC).options


def test_request_selecting_names_the_offer_and_its_server() -> None:
    offer = ack(server_id=IPv4Address("10.0.2.2").packed)
    selecting = request(7, MAC, offer=offer)
    assert selecting.type is MessageType.REQUEST
    assert selecting.options[Option.REQUESTED_ADDRESS] == IPv4Address("10.0.2.15").packed
    assert selecting.options[Option.SERVER_ID] == IPv4Address("10.0.2.2").packed
    assert selecting.ciaddr == IPv4Address("0.0.0.0")


def test_request_renewing_uses_ciaddr_without_server_or_requested_address() -> None:
    renewing = request(9, MAC, ciaddr=IPv4Address("10.0.2.15"))
    assert renewing.ciaddr == IPv4Address("10.0.2.15")
    assert Option.SERVER_ID not in renewing.options
    assert Option.REQUESTED_ADDRESS not in renewing.options


def test_long_options_are_split_and_concatenated_again() -> None:
    value = bytes(range(256)) * 2  # 512 bytes: three chunks on the wire
    wire = encode_options({Option.DOMAIN_SEARCH: value, Option.MESSAGE_TYPE: b"\x05"})
    assert wire.count(bytes([Option.DOMAIN_SEARCH, 255])) == 2
    assert decode_options(wire) == {Option.DOMAIN_SEARCH: value, Option.MESSAGE_TYPE: b"\x05"}


def test_pad_and_end_and_truncated_options() -> None:
    assert decode_options(b"\x00\x00\x35\x01\x02\xff\x01\x04") == {53: b"\x02"}
    with pytest.raises(DhcpDecodeError, match="runs past the end"):
        decode_options(b"\x01\x04\xff\xff")


def test_overloaded_file_and_sname_fields_hold_options() -> None:
    message = ack()
    raw = bytearray(message.encode())
    # Option 52 = 3: more options live in 'file' (offset 108) and 'sname' (offset 44).
    end = raw.index(b"\xff", 240)
    raw[end : end + 4] = b"\x34\x01\x03\xff"
    raw[108:114] = b"\x0f\x03lab\xff"[:6]
    raw[44:51] = b"\x0c\x04node\xff"[:7]
    back = DhcpMessage.decode(bytes(raw))
    assert back.options[Option.DOMAIN_NAME] == b"lab"
    assert back.options[Option.HOSTNAME] == b"node"
    assert Option.OVERLOAD not in back.options


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x02" * 100, "too short"),
        (bytes(240), "magic cookie"),
        (DhcpMessage(op=3, xid=1, chaddr=b"\x00" * 6).encode(), "not an Ethernet DHCP"),
    ],
)
def test_malformed_messages_are_refused(data: bytes, error: str) -> None:
    with pytest.raises(DhcpDecodeError, match=error):
        DhcpMessage.decode(data)


def test_lease_from_ack_reads_every_option() -> None:
    message = ack(
        subnet_mask=IPv4Address("255.255.255.0").packed,
        router=IPv4Address("10.0.2.2").packed + IPv4Address("10.0.2.3").packed,
        dns_servers=IPv4Address("10.0.2.3").packed,
        domain_name=b"example.test\x00",
        ntp_servers=IPv4Address("10.0.2.4").packed,
        lease_time=struct.pack("!I", 86400),
        server_id=IPv4Address("10.0.2.2").packed,
        mtu=struct.pack("!H", 1400),
    )
    lease = Lease.from_ack(message, now=100.0)
    assert lease.address == IPv4Interface("10.0.2.15/24")
    assert lease.server == IPv4Address("10.0.2.2")
    assert lease.routers == (IPv4Address("10.0.2.2"), IPv4Address("10.0.2.3"))
    assert lease.dns_servers == (IPv4Address("10.0.2.3"),)
    assert lease.ntp_servers == (IPv4Address("10.0.2.4"),)
    assert lease.domain == "example.test"
    assert lease.mtu == 1400
    # T1 and T2 default to 1/2 and 7/8 of the lease.
    assert (lease.renewal_time, lease.rebinding_time) == (43200, 75600)
    assert (lease.renew_at, lease.rebind_at, lease.expires_at) == (43300.0, 75700.0, 86500.0)
    assert lease.remaining(86400.0) == 100
    assert lease.routes() == ((IPv4Network("0.0.0.0/0"), IPv4Address("10.0.2.2")),)


def test_lease_times_are_kept_in_order_and_infinite_leases_never_expire() -> None:
    odd = Lease.from_ack(
        ack(
            lease_time=struct.pack("!I", 100),
            renewal_time=struct.pack("!I", 500),
            rebinding_time=struct.pack("!I", 90),
        ),
        now=0.0,
    )
    assert (odd.renewal_time, odd.rebinding_time, odd.lease_time) == (90, 90, 100)
    forever = Lease.from_ack(ack(lease_time=struct.pack("!I", INFINITE)), now=0.0)
    assert forever.infinite
    assert forever.remaining(1e9) == INFINITE


def test_lease_without_a_mask_uses_the_address_class_and_server_falls_back() -> None:
    lease = Lease.from_ack(ack(), now=0.0, server=IPv4Address("10.0.2.2"))
    assert lease.address == IPv4Interface("10.0.2.15/8")
    assert lease.server == IPv4Address("10.0.2.2")


def test_classless_routes_win_over_routers() -> None:
    raw = (
        bytes([0]) + IPv4Address("10.0.2.2").packed  # default
        + bytes([24, 192, 168, 7]) + IPv4Address("10.0.2.9").packed
        + bytes([32, 10, 1, 2, 3]) + IPv4Address("0.0.0.0").packed  # on link
    )  # fmt: skip
    routes = decode_classless_routes(raw)
    assert routes == (
        (IPv4Network("0.0.0.0/0"), IPv4Address("10.0.2.2")),
        (IPv4Network("192.168.7.0/24"), IPv4Address("10.0.2.9")),
        (IPv4Network("10.1.2.3/32"), IPv4Address("0.0.0.0")),
    )
    lease = Lease.from_ack(
        ack(router=IPv4Address("10.0.2.99").packed, classless_routes=raw), now=0.0
    )
    assert lease.routes() == routes
    with pytest.raises(DhcpDecodeError):
        decode_classless_routes(bytes([33, 1, 2, 3, 4, 5, 6, 7, 8, 9]))


def test_domain_search_with_compression_pointers() -> None:
    # "example.test" then "lab" + pointer to offset 0 ("lab.example.test").
    raw = b"\x07example\x04test\x00" + b"\x03lab\xc0\x00"
    assert decode_domain_search(raw) == ("example.test", "lab.example.test")
    with pytest.raises(DhcpDecodeError):
        decode_domain_search(b"\xc0\x00")  # a pointer loop


def test_ipv4_udp_framing_round_trips_with_valid_checksums() -> None:
    payload = discover(5, MAC).encode()
    packet = build_ipv4_udp(IPv4Address("0.0.0.0"), IPv4Address("255.255.255.255"), 68, 67, payload)
    assert packet[0] == 0x45 and packet[9] == 17
    assert struct.unpack("!H", packet[2:4])[0] == len(packet)

    def folded(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data + b"\0" * (len(data) % 2)))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return total

    assert folded(packet[:20]) == 0xFFFF  # header checksum verifies
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 17, len(packet) - 20)
    assert folded(pseudo + packet[20:]) == 0xFFFF  # UDP checksum verifies
    parsed = parse_ipv4_udp(packet)
    assert parsed == (IPv4Address("0.0.0.0"), 68, IPv4Address("255.255.255.255"), 67, payload)


def test_parse_ipv4_udp_ignores_what_is_not_one_whole_udp_datagram() -> None:
    good = build_ipv4_udp(IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), 67, 68, b"x" * 40)
    assert parse_ipv4_udp(good) is not None
    tcp = good[:9] + b"\x06" + good[10:]
    fragment = good[:6] + b"\x20\x00" + good[8:]
    assert parse_ipv4_udp(tcp) is None
    assert parse_ipv4_udp(fragment) is None
    assert parse_ipv4_udp(good[:27]) is None
    assert parse_ipv4_udp(b"\x60" + good[1:]) is None  # IPv6


def _run_bpf(packet: bytes) -> int:
    """A tiny interpreter for the handful of classic BPF instructions the filter uses."""
    acc = x = pc = 0
    while True:
        code, jt, jf, k = _BPF_PROGRAM[pc]
        pc += 1
        if code == 0x30:
            acc = packet[k]
        elif code == 0x28:
            acc = struct.unpack_from("!H", packet, k)[0]
        elif code == 0x48:
            acc = struct.unpack_from("!H", packet, x + k)[0]
        elif code == 0xB1:
            x = 4 * (packet[k] & 0x0F)
        elif code == 0x15:
            pc += jt if acc == k else jf
        elif code == 0x45:
            pc += jt if acc & k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


def test_bpf_filter_passes_only_udp_to_port_68() -> None:
    src, dst = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    assert _run_bpf(build_ipv4_udp(src, dst, 67, 68, b"offer")) > 0
    assert _run_bpf(build_ipv4_udp(src, dst, 68, 67, b"our own discover")) == 0
    to_68 = build_ipv4_udp(src, dst, 67, 68, b"x")
    assert _run_bpf(to_68[:9] + b"\x06" + to_68[10:]) == 0  # TCP
    assert _run_bpf(to_68[:6] + b"\x00\x10" + to_68[8:]) == 0  # a later fragment


def test_an_ack_with_a_mask_that_is_no_netmask_is_refused_not_a_crash() -> None:
    """Found by tests/fuzz/test_fuzz_dhcp.py: 0.0.1.0 as the subnet mask crashed the client."""
    from basalt.machined.sys.dhcp.packet import DhcpDecodeError, DhcpMessage, Lease

    ack = bytes(236) + b"c\x82Sc" + b"\x01\x04\x00\x00\x01\x00"
    ack = b"\x01\x01\x06" + ack[3:]
    with pytest.raises(DhcpDecodeError, match=r"subnet mask 0\.0\.1\.0 is not a netmask"):
        Lease.from_ack(DhcpMessage.decode(ack), 0.0)
