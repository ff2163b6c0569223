"""The capture-filter compiler (basalt.machinery.bpf): programs run in a classic BPF
interpreter (tests/fakes/bpf_vm.py) over hand-built frames, checked against a table of
expected decisions and, when tcpdump is installed, against tcpdump's own decisions (its
-ddd program in the same interpreter, and libpcap filtering a capture file with -r)."""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from basalt.machinery import bpf
from basalt.machinery.bpf import FilterError, compile_filter, format_program, parse_raw
from tests.fakes import bpf_vm

MAC_A, MAC_B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


# -- hand-built frames --------------------------------------------------------------------------


def ether(ethertype: int, payload: bytes) -> bytes:
    return MAC_B + MAC_A + struct.pack("!H", ethertype) + payload


def tcp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)


def udp(sport: int, dport: int, payload: bytes = b"hello") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp_echo() -> bytes:
    return struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping"


def ipv4(
    proto: int,
    src: str,
    dst: str,
    payload: bytes,
    *,
    options: bytes = b"",
    fragment_offset: int = 0,
    more_fragments: bool = False,
) -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    flags = (0x2000 if more_fragments else 0) | fragment_offset
    header = struct.pack(
        "!BBHHHBBH4s4s",
        (4 << 4) | ihl,
        0,
        ihl * 4 + len(payload),
        0x1234,
        flags,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return ether(0x0800, header + options + payload)


def ipv6(next_header: int, src: str, dst: str, payload: bytes) -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload),
        next_header,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return ether(0x86DD, header + payload)


def ipv6_fragment(next_header: int, offset: int, payload: bytes) -> bytes:
    return struct.pack("!BBHI", next_header, 0, offset << 3, 0xBEEF) + payload


def arp_request(sender: str, target: str) -> bytes:
    body = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        0x0800,
        6,
        4,
        1,
        MAC_A,
        ipaddress.IPv4Address(sender).packed,
        b"\0" * 6,
        ipaddress.IPv4Address(target).packed,
    )
    return ether(0x0806, body)


PACKETS: dict[str, bytes] = {
    "tcp4": ipv4(6, "10.0.0.1", "10.0.0.2", tcp(1234, 80)),
    # IHL 7: the ports sit 8 bytes further in
    "tcp4_opts": ipv4(6, "10.0.0.1", "10.0.0.2", tcp(1234, 80), options=b"\x01" * 8),
    # IHL 6 with a source port of 53 where an IHL-5 reader would look for it
    "tcp4_opts_decoy": ipv4(6, "10.0.0.9", "10.0.0.10", tcp(2000, 2001), options=b"\0\x35\0\x35"),
    "udp4": ipv4(17, "10.0.0.1", "192.168.1.1", udp(5353, 53)),
    "udp4_first_frag": ipv4(17, "10.0.0.1", "10.0.0.2", udp(40000, 53), more_fragments=True),
    # a later fragment: bytes where ports would be read say 53, but it has no ports
    "udp4_later_frag": ipv4(17, "10.0.0.1", "10.0.0.2", udp(53, 53), fragment_offset=185),
    "icmp4": ipv4(1, "10.0.0.1", "10.0.0.2", icmp_echo()),
    "tcp6": ipv6(6, "fd00::1", "fd00::2", tcp(40000, 443)),
    "udp6": ipv6(17, "2001:db8::1", "fd00::2", udp(53, 5000)),
    "udp6_frag": ipv6(44, "2001:db8::1", "2001:db8::2", ipv6_fragment(17, 0, udp(53, 53))),
    "icmp6": ipv6(58, "fe80::1", "ff02::1", struct.pack("!BBH", 135, 0, 0) + b"\0" * 20),
    "arp": arp_request("10.0.0.1", "10.0.0.2"),
    "runt": MAC_B + MAC_A[:4],
}
V4 = {"tcp4", "tcp4_opts", "tcp4_opts_decoy", "udp4", "udp4_first_frag", "udp4_later_frag", "icmp4"}
V6 = {"tcp6", "udp6", "udp6_frag", "icmp6"}

#: filter -> the packets it accepts (worked out by hand from the formats above).
EXPECTED: dict[str, set[str]] = {
    "": set(PACKETS),
    "ip": V4,
    "ip6": V6,
    "arp": {"arp"},
    "tcp": {"tcp4", "tcp4_opts", "tcp4_opts_decoy", "tcp6"},
    "udp": {"udp4", "udp4_first_frag", "udp4_later_frag", "udp6", "udp6_frag"},
    "icmp": {"icmp4"},
    "icmp6": {"icmp6"},
    "port 53": {"udp4", "udp4_first_frag", "udp6"},
    "port 53 or 443": {"udp4", "udp4_first_frag", "udp6", "tcp6"},
    "src port 53": {"udp6"},
    "udp dst port 53": {"udp4", "udp4_first_frag"},
    "tcp port 53": set(),
    "tcp port 80": {"tcp4", "tcp4_opts"},
    "dst port 80 && tcp": {"tcp4", "tcp4_opts"},
    "src port 80": set(),
    "tcp src port 2000": {"tcp4_opts_decoy"},
    "portrange 50-100": {"tcp4", "tcp4_opts", "udp4", "udp4_first_frag", "udp6"},
    "udp portrange 5000-5353": {"udp4", "udp6"},
    "tcp dst portrange 400-500": {"tcp6"},
    "host 10.0.0.2": {"tcp4", "tcp4_opts", "udp4_first_frag", "udp4_later_frag", "icmp4", "arp"},
    "src host 10.0.0.2": set(),
    "dst host 10.0.0.2 and not arp": {
        "tcp4",
        "tcp4_opts",
        "udp4_first_frag",
        "udp4_later_frag",
        "icmp4",
    },
    "host fd00::2": {"tcp6", "udp6"},
    "src host 2001:db8::1": {"udp6", "udp6_frag"},
    "net 192.168.0.0/16": {"udp4"},
    "src net 10.0.0.0/30": {
        "tcp4",
        "tcp4_opts",
        "udp4",
        "udp4_first_frag",
        "udp4_later_frag",
        "icmp4",
        "arp",
    },
    "net fd00::/8": {"tcp6", "udp6"},
    "dst net 2001:db8::/33": {"udp6_frag"},
    "net 2001:db8::/32 and udp": {"udp6", "udp6_frag"},
    "not ip and not ip6": {"arp"},
    "! (tcp || udp)": {"icmp4", "icmp6", "arp"},
    "(icmp or icmp6) and not host 10.0.0.1": {"icmp6"},
    "ip and not (port 80 or port 53)": {"tcp4_opts_decoy", "udp4_later_frag", "icmp4"},
    # and/or bind equally, from the left (pcap-filter): (tcp or udp) and port 53
    "tcp or udp and port 53": {"udp4", "udp4_first_frag", "udp6"},
    "port 53 and udp or icmp": {"udp4", "udp4_first_frag", "udp6", "icmp4"},
    "icmp or tcp and not ip6 or arp": {"icmp4", "tcp4", "tcp4_opts", "tcp4_opts_decoy", "arp"},
}


def accepted(program: bpf_vm.Program) -> set[str]:
    return {name for name, frame in PACKETS.items() if bpf_vm.run(program, frame)}


@pytest.mark.parametrize("expression", list(EXPECTED))
def test_decisions_match_the_table(expression: str) -> None:
    program = compile_filter(expression)
    assert accepted(program) == EXPECTED[expression], format_program(program)


def test_accept_returns_the_snaplen() -> None:
    program = compile_filter("udp", snaplen=96)
    assert bpf_vm.run(program, PACKETS["udp4"]) == 96
    assert bpf_vm.run(program, PACKETS["tcp4"]) == 0
    assert compile_filter("", snaplen=100) == [(bpf.RET_K, 0, 0, 100)]


def test_jumps_fit_in_a_byte_and_stay_inside_the_program() -> None:
    for expression in EXPECTED:
        program = compile_filter(expression)
        for index, (op, jt, jf, _k) in enumerate(program):
            assert 0 <= jt < 256 and 0 <= jf < 256
            if op & 0x07 == 0x05:
                assert index + 1 + max(jt, jf) < len(program)
        assert program[-1].op == bpf.RET_K


def test_a_program_too_large_for_one_byte_jumps_is_refused() -> None:
    huge = " or ".join(f"host fd00::{i:x}" for i in range(40))
    with pytest.raises(FilterError, match="too large"):
        compile_filter(huge)


@pytest.mark.parametrize(
    ("expression", "needle"),
    [
        ("tcp prot 80", "unexpected 'prot' at column 5; expected"),
        ("port", "unexpected the end of the filter at column 5"),
        ("host 10.0.0.256", "'10.0.0.256' at column 6 is not an IP address"),
        ("host example.com", "host names are not resolved"),
        ("net 10.0.0.1/8", "'10.0.0.1/8' at column 5 is not a network: 10.0.0.1/8 has host bits"),
        ("port 70000", "'70000' at column 6 is not a port number"),
        ("port http", "service names are not looked up"),
        ("portrange 80", "not a port range"),
        ("(tcp or udp", "expected ')' to close the '(' at column 1"),
        ("tcp udp", "unexpected 'udp' at column 5; expected 'and', 'or'"),
        ("tcp and", "unexpected the end of the filter at column 8"),
        ("udp or ether host 1", "unexpected 'ether' at column 8"),
        ("port 53 $ 1", "unexpected character '$' at column 9"),
        ("tcp src host 10.0.0.1", "unexpected 'host' at column 9; expected 'port' or 'portrange'"),
    ],
)
def test_errors_name_the_token_its_column_and_what_was_expected(
    expression: str, needle: str
) -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter(expression)
    assert needle in caught.value.render()
    assert caught.value.hint


def test_snaplen_bounds() -> None:
    for bad in (0, bpf.MAX_SNAPLEN + 1):
        with pytest.raises(FilterError, match="snapshot length"):
            compile_filter("tcp", snaplen=bad)


def test_raw_programs_round_trip_and_bad_ones_are_refused() -> None:
    program = compile_filter("udp port 53")
    text = format_program(program)
    assert parse_raw(text) == program
    assert parse_raw(text.replace("\n", ",")) == program
    assert parse_raw("1,6 0 0 65535") == [(6, 0, 0, 65535)]
    for bad, needle in [
        ("", "instruction count"),
        ("2,6 0 0 1", "the count says 2"),
        ("1,6 0 0", "not four numbers"),
        ("1,6 0 0 4294967296", "out of range"),
        ("2,21 5 0 1,6 0 0 0", "jumps past the end"),
        ("1,40 0 0 12", "last instruction must be a return"),
    ]:
        with pytest.raises(FilterError, match=needle):
            parse_raw(bad)


# -- tcpdump as the oracle ----------------------------------------------------------------------

TCPDUMP = shutil.which("tcpdump")
needs_tcpdump = pytest.mark.skipif(TCPDUMP is None, reason="tcpdump is not installed")


def tcpdump_program(expression: str) -> list[tuple[int, int, int, int]]:
    """tcpdump's program; its optimizer refuses one that rejects everything, which is
    returned as ``ret #0``."""
    assert TCPDUMP is not None
    result = subprocess.run(
        [TCPDUMP, "-y", "EN10MB", "-ddd", expression], capture_output=True, text=True, check=False
    )
    if result.returncode and "expression rejects all packets" in result.stderr:
        return [(bpf.RET_K, 0, 0, 0)]
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()[1:]
    return [tuple(int(f) for f in line.split()) for line in lines]  # type: ignore[misc]


def write_pcap(path: Path, frames: list[bytes]) -> None:
    records = b"".join(
        struct.pack("<IIII", 1_700_000_000 + i, 0, len(f), len(f)) + f for i, f in enumerate(frames)
    )
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + records)


def read_pcap(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert struct.unpack_from("<I", data)[0] == 0xA1B2C3D4
    frames, at = [], 24
    while at < len(data):
        _sec, _usec, caplen, _length = struct.unpack_from("<IIII", data, at)
        frames.append(data[at + 16 : at + 16 + caplen])
        at += 16 + caplen
    return frames


@needs_tcpdump
@pytest.mark.parametrize("expression", [e for e in EXPECTED if e])
def test_same_decisions_as_tcpdump(expression: str, tmp_path: Path) -> None:
    ours = accepted(compile_filter(expression))
    theirs_in_vm = accepted(tcpdump_program(expression))
    # and libpcap itself filtering a capture file (no interpreter of ours involved)
    names = [n for n in PACKETS if n != "runt"]  # tcpdump -r skips a frame shorter than 14
    source, kept = tmp_path / "in.pcap", tmp_path / "out.pcap"
    write_pcap(source, [PACKETS[n] for n in names])
    subprocess.run(
        [str(TCPDUMP), "-r", str(source), "-w", str(kept), expression],
        check=True,
        capture_output=True,
    )
    by_frame = {PACKETS[n]: n for n in names}
    theirs_by_libpcap = {by_frame[f] for f in read_pcap(kept)}
    assert ours == theirs_in_vm
    assert ours - {"runt"} == theirs_by_libpcap


@needs_tcpdump
def test_tcpdumps_raw_program_is_accepted_as_is() -> None:
    assert TCPDUMP is not None
    out = subprocess.run(
        [TCPDUMP, "-y", "EN10MB", "-ddd", "vlan or ether broadcast"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    program = parse_raw(out)
    assert len(program) == int(out.split()[0])


# -- random filters and frames against tcpdump -------------------------------------------------

ADDRESSES_V4 = ["10.0.0.1", "10.0.0.2", "192.168.1.1"]
ADDRESSES_V6 = ["fd00::1", "fd00::2", "2001:db8::1"]
PORTS = [53, 80, 443, 5353]


def primitives() -> st.SearchStrategy[str]:
    direction = st.sampled_from(["", "src ", "dst "])
    proto = st.sampled_from(["", "tcp ", "udp "])
    port = st.sampled_from(PORTS)
    return st.one_of(
        st.sampled_from(["ip", "ip6", "arp", "tcp", "udp", "icmp", "icmp6"]),
        st.builds(
            lambda d, a: f"{d}host {a}", direction, st.sampled_from(ADDRESSES_V4 + ADDRESSES_V6)
        ),
        st.builds(
            lambda d, n: f"{d}net {n}",
            direction,
            st.sampled_from(
                [
                    "10.0.0.0/8",
                    "10.0.0.0/31",
                    "192.168.0.0/16",
                    "0.0.0.0/0",
                    "fd00::/8",
                    "2001:db8::/32",
                    "fd00::/127",
                    "::/0",
                ]
            ),
        ),
        st.builds(lambda p, d, n: f"{p}{d}port {n}", proto, direction, port),
        st.builds(lambda p, d, a, b: f"{p}{d}portrange {a}-{b}", proto, direction, port, port),
    )


def expressions() -> st.SearchStrategy[str]:
    return st.recursive(
        primitives(),
        lambda inner: st.one_of(
            st.builds(lambda e: f"not {e}", inner),
            st.builds(lambda e: f"({e})", inner),
            st.builds(
                lambda a, op, b: f"{a} {op} {b}",
                inner,
                st.sampled_from(["and", "or", "&&", "||"]),
                inner,
            ),
        ),
        max_leaves=6,
    )


def frames() -> st.SearchStrategy[bytes]:
    v4, v6, port = (
        st.sampled_from(ADDRESSES_V4),
        st.sampled_from(ADDRESSES_V6),
        st.sampled_from(PORTS),
    )
    transport = st.one_of(
        st.builds(lambda a, b: (6, tcp(a, b)), port, port),
        st.builds(lambda a, b: (17, udp(a, b)), port, port),
    )
    return st.one_of(
        st.builds(
            lambda s, d, t, opts, frag: ipv4(
                t[0], s, d, t[1], options=b"\x01" * 4 * opts, fragment_offset=frag
            ),
            v4,
            v4,
            transport,
            st.integers(0, 3),
            st.sampled_from([0, 0, 7]),
        ),
        st.builds(lambda s, d, t: ipv6(t[0], s, d, t[1]), v6, v6, transport),
        st.builds(lambda s, d, t: ipv6(44, s, d, ipv6_fragment(t[0], 0, t[1])), v6, v6, transport),
        st.builds(arp_request, v4, v4),
    )


@needs_tcpdump
@settings(max_examples=80, deadline=None)
@given(expression=expressions(), frame=frames())
def test_random_filters_decide_like_tcpdump(expression: str, frame: bytes) -> None:
    ours = compile_filter(expression)
    theirs = tcpdump_program(expression)
    # Not the runt: tcpdump's optimizer folds tautologies (``not ip or ip``) into "accept"
    # without loading anything, where a load past a 10-byte frame rejects it; no real
    # Ethernet or loopback frame is shorter than its header.
    whole = [p for name, p in PACKETS.items() if name != "runt"]
    for packet in [*whole, frame]:
        assert bool(bpf_vm.run(ours, packet)) == bool(bpf_vm.run(theirs, packet)), (
            expression,
            packet.hex(),
        )
