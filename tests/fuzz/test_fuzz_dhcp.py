"""Fuzz target: the DHCP client's packet parsing (what any host on the link may send).

Oracle: a packet decodes, or is refused with DhcpDecodeError; a decoded ACK either makes a
lease or is refused the same way; nothing else is raised. Inputs: random bytes, and
mutations of a well-formed ACK (the parser's interesting paths are behind the cookie).
"""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from basalt.machined.sys.dhcp.packet import (
    DhcpDecodeError,
    DhcpMessage,
    Lease,
    MessageType,
    Option,
    encode_options,
    parse_ipv4_udp,
)
from tests.fuzz.conftest import fuzz

MAC = bytes.fromhex("525400ba5a01")


def _ack() -> bytes:
    options = {
        Option.MESSAGE_TYPE: bytes([MessageType.ACK]),
        Option.SERVER_ID: IPv4Address("10.5.0.2").packed,
        Option.LEASE_TIME: (3600).to_bytes(4, "big"),
        Option.SUBNET_MASK: IPv4Address("255.255.255.0").packed,
        Option.ROUTER: IPv4Address("10.5.0.2").packed,
        Option.DNS_SERVERS: IPv4Address("10.5.0.3").packed,
    }
    message = DhcpMessage(
        op=2,
        xid=7,
        chaddr=MAC,
        options={int(k): v for k, v in options.items()},
        yiaddr=IPv4Address("10.5.0.11"),
    )
    return message.encode()


ACK = _ack()


@st.composite
def mutated_ack(draw: st.DrawFn) -> bytes:
    data = bytearray(ACK)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert", "option"]))
        if action == "flip":
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at:]
            if not data:
                break
        elif action == "insert":
            data[at:at] = draw(st.binary(max_size=8))
        else:
            code = draw(st.integers(0, 255))
            data += encode_options({code: draw(st.binary(max_size=12))})
    return bytes(data)


@fuzz
@given(st.one_of(st.binary(max_size=600), mutated_ack()))
def test_fuzz_dhcp_messages(data: bytes) -> None:
    try:
        message = DhcpMessage.decode(data)
    except DhcpDecodeError:
        return
    with contextlib.suppress(DhcpDecodeError):
        Lease.from_ack(message, 0.0)


@fuzz
@given(st.binary(max_size=700))
def test_fuzz_ipv4_udp_frames(packet: bytes) -> None:
    parse_ipv4_udp(packet)  # None for anything that is not IPv4/UDP; never raises
