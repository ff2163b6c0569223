"""Capture filters: a compiler from a subset of the pcap-filter language to classic BPF.

``basaltctl pcap --bpf-filter EXPR`` compiles here, on the client; the node attaches the
program to its raw socket as it is (SO_ATTACH_FILTER). The subset, for Ethernet framing
(what Linux gives AF_PACKET sockets on ethernet and loopback interfaces):

* protocols: ``ip``, ``ip6``, ``arp``, ``tcp``, ``udp``, ``icmp``, ``icmp6``
* hosts and networks: ``[src|dst] host ADDR``, ``[src|dst] net CIDR`` (IPv4 or IPv6;
  an IPv4 host or net also matches the sender/target addresses of ARP and RARP, as
  tcpdump does)
* ports: ``[tcp|udp] [src|dst] port N``, ``[tcp|udp] [src|dst] portrange A-B`` (without
  ``tcp``/``udp``: TCP, UDP or SCTP, as tcpdump does)
* ``and``/``&&``, ``or``/``||``, ``not``/``!``, parentheses; as in pcap-filter, ``and``
  and ``or`` bind equally, from the left; a bare value repeats the previous primitive's
  qualifiers (``port 53 or 853``)

The decisions follow tcpdump's: IPv4 ports are read behind the header length (IHL) and
only from the first fragment; IPv6 ports only when the next header is TCP/UDP/SCTP;
``tcp``/``udp``/``icmp6`` on IPv6 also see a fragment header's next header. Anything
else can be given as a raw program (:func:`parse_raw`, the ``tcpdump -ddd`` format).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import InvalidRequestError

#: The kernel's limit on a classic BPF program (BPF_MAXINSNS).
MAX_INSTRUCTIONS = 4096
#: The largest snapshot length (tcpdump's default).
MAX_SNAPLEN = 262144
DEFAULT_SNAPLEN = 65535

# Opcodes (linux/filter.h): class | size | mode, class | op | source.
LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_H_IND = 0x48
LDX_B_MSH = 0xB1
ALU_AND_K = 0x54
JA = 0x05
JEQ_K, JGT_K, JGE_K, JSET_K = 0x15, 0x25, 0x35, 0x45
RET_K = 0x06

ETHERTYPE_IP, ETHERTYPE_IPV6, ETHERTYPE_ARP, ETHERTYPE_RARP = 0x0800, 0x86DD, 0x0806, 0x8035
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMP6, PROTO_SCTP = 1, 6, 17, 58, 132
IPV6_FRAGMENT = 44
# Offsets in an Ethernet frame.
ETHERTYPE_AT = 12
IP_START = 14
IP_FRAGMENT_AT, IP_PROTO_AT, IP_SRC_AT, IP_DST_AT = 20, 23, 26, 30
IP6_NEXT_AT, IP6_SRC_AT, IP6_DST_AT, IP6_PAYLOAD_AT = 20, 22, 38, 54
ARP_SPA_AT, ARP_TPA_AT = 28, 38


class Instruction(NamedTuple):
    """One classic BPF instruction, ``struct sock_filter``."""

    op: int
    jt: int
    jf: int
    k: int


class FilterError(InvalidRequestError):
    """A capture filter that does not compile, or a raw program that does not parse; it
    names the token, its column and what was expected."""


# -- the tree a filter becomes ----------------------------------------------------------------


@dataclass(frozen=True)
class Test:
    """Load (instructions without jumps), then one conditional jump on A against ``k``."""

    loads: tuple[Instruction, ...]
    jump: int
    k: int


@dataclass(frozen=True)
class All:
    """True when every item is (an empty one: always)."""

    items: tuple[Expr, ...]


@dataclass(frozen=True)
class AnyOf:
    """True when any item is (an empty one: never)."""

    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Not:
    """Compiled by swapping the item's true and false targets (no instruction)."""

    item: Expr


Expr = Test | All | AnyOf | Not


def _load(op: int, k: int) -> Instruction:
    return Instruction(op, 0, 0, k)


def _eq(size_op: int, at: int, value: int) -> Test:
    return Test((_load(size_op, at),), JEQ_K, value)


def _ethertype(value: int) -> Test:
    return _eq(LD_H_ABS, ETHERTYPE_AT, value)


def _ip_proto(proto: int) -> Expr:
    return All((_ethertype(ETHERTYPE_IP), _eq(LD_B_ABS, IP_PROTO_AT, proto)))


def _ip6_proto(proto: int) -> Expr:
    behind_fragment = All(
        (_eq(LD_B_ABS, IP6_NEXT_AT, IPV6_FRAGMENT), _eq(LD_B_ABS, IP6_PAYLOAD_AT, proto))
    )
    return All(
        (_ethertype(ETHERTYPE_IPV6), AnyOf((_eq(LD_B_ABS, IP6_NEXT_AT, proto), behind_fragment)))
    )


PROTOCOLS: dict[str, Expr] = {
    "ip": _ethertype(ETHERTYPE_IP),
    "ip6": _ethertype(ETHERTYPE_IPV6),
    "arp": _ethertype(ETHERTYPE_ARP),
    "tcp": AnyOf((_ip_proto(PROTO_TCP), _ip6_proto(PROTO_TCP))),
    "udp": AnyOf((_ip_proto(PROTO_UDP), _ip6_proto(PROTO_UDP))),
    "icmp": _ip_proto(PROTO_ICMP),
    "icmp6": _ip6_proto(PROTO_ICMP6),
}
#: The transport protocols a port belongs to: ``port`` alone means any of them.
PORT_PROTOCOLS = {"tcp": (PROTO_TCP,), "udp": (PROTO_UDP,), "": (PROTO_SCTP, PROTO_TCP, PROTO_UDP)}
KINDS = ("host", "net", "port", "portrange")
DIRECTIONS = ("src", "dst")


def _either(direction: str, src: Expr, dst: Expr) -> Expr:
    if direction == "src":
        return src
    if direction == "dst":
        return dst
    return AnyOf((src, dst))


def _masked(at: int, value: int, mask: int) -> Test:
    if mask == 0xFFFFFFFF:
        return _eq(LD_W_ABS, at, value)
    return Test((_load(LD_W_ABS, at), _load(ALU_AND_K, mask)), JEQ_K, value & mask)


def _v4_net(network: ipaddress.IPv4Network, direction: str) -> Expr:
    value, mask = int(network.network_address), int(network.netmask)
    ip = All(
        (
            _ethertype(ETHERTYPE_IP),
            _either(direction, _masked(IP_SRC_AT, value, mask), _masked(IP_DST_AT, value, mask)),
        )
    )
    arp = All(
        (
            AnyOf((_ethertype(ETHERTYPE_ARP), _ethertype(ETHERTYPE_RARP))),
            _either(direction, _masked(ARP_SPA_AT, value, mask), _masked(ARP_TPA_AT, value, mask)),
        )
    )
    return AnyOf((ip, arp))


def _v6_words(at: int, network: ipaddress.IPv6Network) -> Expr:
    value, prefix = int(network.network_address), network.prefixlen
    tests: list[Expr] = []
    for word in range(4):
        bits = min(max(prefix - 32 * word, 0), 32)
        if bits == 0:
            break
        mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
        tests.append(_masked(at + 4 * word, (value >> (96 - 32 * word)) & 0xFFFFFFFF, mask))
    return All(tuple(tests))


def _v6_net(network: ipaddress.IPv6Network, direction: str) -> Expr:
    src, dst = _v6_words(IP6_SRC_AT, network), _v6_words(IP6_DST_AT, network)
    return All((_ethertype(ETHERTYPE_IPV6), _either(direction, src, dst)))


def _port_test(load: tuple[Instruction, ...], low: int, high: int) -> Expr:
    if low == high:
        return Test(load, JEQ_K, low)
    return All((Test(load, JGE_K, low), Not(Test(load, JGT_K, high))))


def _ports(protos: tuple[int, ...], direction: str, low: int, high: int) -> Expr:
    v6_src = _port_test((_load(LD_H_ABS, IP6_PAYLOAD_AT),), low, high)
    v6_dst = _port_test((_load(LD_H_ABS, IP6_PAYLOAD_AT + 2),), low, high)
    v6 = All(
        (
            _ethertype(ETHERTYPE_IPV6),
            AnyOf(tuple(_eq(LD_B_ABS, IP6_NEXT_AT, p) for p in protos)),
            _either(direction, v6_src, v6_dst),
        )
    )
    header_length = _load(LDX_B_MSH, IP_START)  # X = 4 * (IHL)
    v4_src = _port_test((header_length, _load(LD_H_IND, IP_START)), low, high)
    v4_dst = _port_test((header_length, _load(LD_H_IND, IP_START + 2)), low, high)
    v4 = All(
        (
            _ethertype(ETHERTYPE_IP),
            AnyOf(tuple(_eq(LD_B_ABS, IP_PROTO_AT, p) for p in protos)),
            Not(Test((_load(LD_H_ABS, IP_FRAGMENT_AT),), JSET_K, 0x1FFF)),  # first fragment
            _either(direction, v4_src, v4_dst),
        )
    )
    return AnyOf((v6, v4))


# -- parsing ------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(&&|\|\||[()!])|([A-Za-z0-9_.:/\-]+))")
_PRIMITIVES = "ip, ip6, arp, tcp, udp, icmp, icmp6, [src|dst] host/net/port/portrange"


@dataclass(frozen=True)
class Token:
    text: str
    column: int  # 1-based


def tokenize(text: str) -> list[Token]:
    """The filter's tokens with their columns; an unknown character is a FilterError."""
    tokens: list[Token] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None:
            column = position + len(text[position:]) - len(text[position:].lstrip()) + 1
            raise FilterError(
                f"capture filter: unexpected character {text[column - 1]!r} at column {column}",
                hint=f"the filter language subset is: {_PRIMITIVES}, and/or/not, ( )",
            )
        start = match.start(1) if match.group(1) else match.start(2)
        tokens.append(Token(match.group(1) or match.group(2), start + 1))
        position = match.end()
    return tokens


@dataclass
class _Qualifiers:
    proto: str = ""  # "", "tcp", "udp"
    direction: str = ""  # "", "src", "dst"
    kind: str = ""  # host, net, port, portrange


@dataclass
class _Parser:
    text: str
    tokens: list[Token]
    position: int = 0
    last: _Qualifiers | None = None
    _end: Token = field(init=False)

    def __post_init__(self) -> None:
        self._end = Token("", len(self.text.rstrip()) + 1)

    def peek(self) -> Token:
        return self.tokens[self.position] if self.position < len(self.tokens) else self._end

    def take(self) -> Token:
        token = self.peek()
        self.position += 1
        return token

    def fail(self, token: Token, expected: str) -> FilterError:
        what = f"{token.text!r}" if token.text else "the end of the filter"
        return FilterError(
            f"capture filter: unexpected {what} at column {token.column}; expected {expected}",
            hint=f"the subset understands {_PRIMITIVES}, combined with and/or/not and ( ); "
            "for anything else give the program with --bpf-raw (tcpdump -ddd prints it)",
        )

    def expression(self) -> Expr:
        """``and`` and ``or`` bind equally and from the left, as in pcap-filter:
        ``tcp or udp and port 53`` is ``(tcp or udp) and port 53``."""
        tree = self.unary()
        while self.peek().text in ("and", "&&", "or", "||"):
            combine = All if self.take().text in ("and", "&&") else AnyOf
            right = self.unary()
            if isinstance(tree, combine):
                tree = combine((*tree.items, right))
            else:
                tree = combine((tree, right))
        return tree

    def unary(self) -> Expr:
        token = self.peek()
        if token.text in ("not", "!"):
            self.take()
            return Not(self.unary())
        if token.text == "(":
            self.take()
            inner = self.expression()
            if self.peek().text != ")":
                raise self.fail(self.peek(), f"')' to close the '(' at column {token.column}")
            self.take()
            return inner
        return self.primitive()

    def primitive(self) -> Expr:
        token = self.peek()
        word = token.text
        if word in PROTOCOLS and not self._qualified_proto(word):
            self.take()
            self.last = None
            return PROTOCOLS[word]
        if word in ("tcp", "udp", *DIRECTIONS, *KINDS):
            return self.qualified(_Qualifiers())
        if self.last is not None and word and word not in ("and", "or", "&&", "||", ")"):
            return self.value(self.last)  # ``port 53 or 853``: the same qualifiers again
        raise self.fail(token, f"a primitive ({_PRIMITIVES}), 'not' or '('")

    def _qualified_proto(self, word: str) -> bool:
        following = (
            self.tokens[self.position + 1].text if self.position + 1 < len(self.tokens) else ""
        )
        return word in ("tcp", "udp") and following in (*DIRECTIONS, "port", "portrange")

    def qualified(self, qualifiers: _Qualifiers) -> Expr:
        if self.peek().text in ("tcp", "udp"):
            qualifiers.proto = self.take().text
        if self.peek().text in DIRECTIONS:
            qualifiers.direction = self.take().text
        kinds = ("port", "portrange") if qualifiers.proto else KINDS
        token = self.peek()
        if token.text not in kinds:
            raise self.fail(token, " or ".join(repr(k) for k in kinds))
        qualifiers.kind = self.take().text
        self.last = qualifiers
        return self.value(qualifiers)

    def value(self, q: _Qualifiers) -> Expr:
        token = self.take()
        if not token.text or token.text in ("(", ")", "!", "&&", "||"):
            raise self.fail(token, f"the value of {q.kind!r}")
        if q.kind == "host":
            return _host(token, q.direction)
        if q.kind == "net":
            return _net(token, q.direction)
        if q.kind == "port":
            port = _port_number(token)
            return _ports(PORT_PROTOCOLS[q.proto], q.direction, port, port)
        low, high = _port_range(token)
        return _ports(PORT_PROTOCOLS[q.proto], q.direction, low, high)


def _address_error(token: Token, what: str, reason: str) -> FilterError:
    return FilterError(
        f"capture filter: {token.text!r} at column {token.column} is not {what}: {reason}",
        hint="give numeric addresses (10.0.0.1, fd00::1) and networks in CIDR form "
        "(10.0.0.0/8); host names are not resolved",
    )


def _host(token: Token, direction: str) -> Expr:
    try:
        address = ipaddress.ip_address(token.text)
    except ValueError:
        raise _address_error(token, "an IP address", "not a numeric IPv4 or IPv6 address") from None
    return _net_node(ipaddress.ip_network(address), direction)


def _net(token: Token, direction: str) -> Expr:
    try:
        network = ipaddress.ip_network(token.text, strict=True)
    except ValueError as exc:
        raise _address_error(token, "a network", str(exc)) from None
    return _net_node(network, direction)


def _net_node(network: ipaddress.IPv4Network | ipaddress.IPv6Network, direction: str) -> Expr:
    if isinstance(network, ipaddress.IPv4Network):
        return _v4_net(network, direction)
    return _v6_net(network, direction)


def _port_number(token: Token, text: str | None = None) -> int:
    text = token.text if text is None else text
    if text.isascii() and text.isdigit() and int(text) <= 65535:
        return int(text)
    raise FilterError(
        f"capture filter: {text!r} at column {token.column} is not a port number (0-65535)",
        hint="give port numbers; service names are not looked up",
    )


def _port_range(token: Token) -> tuple[int, int]:
    low, dash, high = token.text.partition("-")
    if not dash:
        raise FilterError(
            f"capture filter: {token.text!r} at column {token.column} is not a port range",
            hint="write a range as LOW-HIGH, e.g. portrange 6000-6010",
        )
    first, last = _port_number(token, low), _port_number(token, high)
    return min(first, last), max(first, last)


def parse(text: str) -> Expr | None:
    """The filter's tree; None for an empty filter (every packet)."""
    tokens = tokenize(text)
    if not tokens:
        return None
    parser = _Parser(text, tokens)
    tree = parser.expression()
    if parser.position < len(tokens):
        raise parser.fail(parser.peek(), "'and', 'or' or the end of the filter")
    return tree


# -- code generation ----------------------------------------------------------------------------


@dataclass
class _Jump:
    op: int
    k: int
    true: int  # labels
    false: int


@dataclass
class _Emitter:
    code: list[Instruction | _Jump | int] = field(default_factory=list)  # int: a label
    labels: int = 0

    def label(self) -> int:
        self.labels += 1
        return self.labels

    def emit(self, node: Expr, true: int, false: int) -> None:
        if isinstance(node, Test):
            self.code.extend(node.loads)
            self.code.append(_Jump(node.jump, node.k, true, false))
        elif isinstance(node, Not):
            self.emit(node.item, false, true)
        elif not node.items:  # an empty conjunction: always true; empty disjunction: false
            self.code.append(_Jump(JA, 0, true if isinstance(node, All) else false, 0))
        else:
            for item in node.items[:-1]:
                then = self.label()
                if isinstance(node, All):
                    self.emit(item, then, false)
                else:
                    self.emit(item, true, then)
                self.code.append(then)
            self.emit(node.items[-1], true, false)


def compile_filter(text: str, snaplen: int = DEFAULT_SNAPLEN) -> list[Instruction]:
    """The classic BPF program of a filter, accepting ``snaplen`` bytes of each packet."""
    check_snaplen(snaplen)
    tree = parse(text)
    if tree is None:
        return [Instruction(RET_K, 0, 0, snaplen)]
    emitter = _Emitter()
    accept, reject = emitter.label(), emitter.label()
    emitter.emit(tree, accept, reject)
    emitter.code.extend(
        [accept, Instruction(RET_K, 0, 0, snaplen), reject, Instruction(RET_K, 0, 0, 0)]
    )
    return _resolve(emitter.code)


def _resolve(code: Sequence[Instruction | _Jump | int]) -> list[Instruction]:
    where: dict[int, int] = {}
    count = 0
    for item in code:
        if isinstance(item, int):
            where[item] = count
        else:
            count += 1
    if count > MAX_INSTRUCTIONS:
        raise FilterError(
            f"capture filter: the program has {count} instructions; the kernel takes at most "
            f"{MAX_INSTRUCTIONS}",
            hint="simplify the filter",
        )
    program: list[Instruction] = []
    for item in code:
        if isinstance(item, int):
            continue
        if isinstance(item, Instruction):
            program.append(item)
            continue
        here = len(program) + 1
        if item.op == JA:
            program.append(Instruction(JA, 0, 0, where[item.true] - here))
            continue
        jt, jf = where[item.true] - here, where[item.false] - here
        if max(jt, jf) > 255:
            raise FilterError(
                f"capture filter: too large for classic BPF (a jump over {max(jt, jf)} "
                "instructions; at most 255)",
                hint="simplify the filter, or compile it elsewhere and pass it with --bpf-raw",
            )
        program.append(Instruction(item.op, jt, jf, item.k))
    return program


def check_snaplen(snaplen: int) -> None:
    if not 1 <= snaplen <= MAX_SNAPLEN:
        raise FilterError(
            f"snapshot length {snaplen} is out of range",
            hint=f"give a snaplen from 1 to {MAX_SNAPLEN} bytes",
        )


# -- raw programs -------------------------------------------------------------------------------


def parse_raw(text: str) -> list[Instruction]:
    """A program in ``tcpdump -ddd`` form: a count, then ``op jt jf k`` per instruction,
    separated by commas or newlines (``4,40 0 0 12,21 0 1 2048,6 0 0 65535,6 0 0 0``)."""
    parts = [p.strip() for p in re.split(r"[,\n]", text) if p.strip()]
    hint = "give the output of 'tcpdump -ddd EXPR' (newlines or commas between lines)"
    if not parts or not parts[0].isdigit():
        raise FilterError("raw BPF program: it must start with the instruction count", hint=hint)
    count = int(parts[0])
    if count != len(parts) - 1 or not 1 <= count <= MAX_INSTRUCTIONS:
        raise FilterError(
            f"raw BPF program: the count says {count} instructions but {len(parts) - 1} follow "
            f"(at most {MAX_INSTRUCTIONS})",
            hint=hint,
        )
    program: list[Instruction] = []
    for number, part in enumerate(parts[1:]):
        fields = part.split()
        limits = (0xFFFF, 0xFF, 0xFF, 0xFFFFFFFF)
        if len(fields) != 4 or not all(f.isascii() and f.isdigit() for f in fields):
            raise FilterError(
                f"raw BPF program: instruction {number} ({part!r}) is not four numbers "
                "'op jt jf k'",
                hint=hint,
            )
        values = [int(f) for f in fields]
        if any(v > limit for v, limit in zip(values, limits, strict=True)):
            raise FilterError(
                f"raw BPF program: instruction {number} ({part!r}) has a field out of range",
                hint=hint,
            )
        instruction = Instruction(*values)
        conditional = instruction.op & 0x07 == 0x05 and instruction.op != JA
        if conditional and number + 1 + max(instruction.jt, instruction.jf) >= count:
            raise FilterError(
                f"raw BPF program: instruction {number} jumps past the end", hint=hint
            )
        program.append(instruction)
    if program[-1].op & 0x07 != RET_K:
        raise FilterError("raw BPF program: the last instruction must be a return", hint=hint)
    return program


def format_program(program: Sequence[Instruction]) -> str:
    """The program as ``tcpdump -ddd`` prints it (what ``parse_raw`` reads)."""
    lines = [str(len(program))] + [f"{i.op} {i.jt} {i.jf} {i.k}" for i in program]
    return "\n".join(lines)
