"""SNTP (RFC 4330) packets: the client request, the checks on an answer, and the clock
offset and round-trip delay it gives.

Timestamps on the wire are NTP's 64-bit fixed point (seconds since 1900-01-01 and a
32-bit fraction); everything here takes and returns Unix seconds as floats. The request
carries the client's transmit time, and a server must echo it as the originate time:
an answer that does not is not ours (late, duplicated or forged) and is refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import BasaltError

__all__ = [
    "NTP_PORT",
    "PACKET_SIZE",
    "Answer",
    "SntpError",
    "decode_answer",
    "encode_request",
    "from_ntp",
    "to_ntp",
]

NTP_PORT = 123
PACKET_SIZE = 48
#: Seconds from the NTP era 0 start (1900-01-01) to the Unix epoch.
NTP_UNIX_DELTA = 2_208_988_800
_VERSION = 4
_MODE_CLIENT, _MODE_SERVER = 3, 4
_LEAP_UNSYNCHRONIZED = 3
_HEADER = struct.Struct("!BBbbII4sQQQQ")


class SntpError(BasaltError):
    """An answer that cannot be used; the message says why."""


def to_ntp(unix: float) -> int:
    """Unix seconds -> NTP 64-bit timestamp."""
    seconds = int(unix // 1) + NTP_UNIX_DELTA
    fraction = int((unix - unix // 1) * (1 << 32)) & 0xFFFFFFFF
    return ((seconds & 0xFFFFFFFF) << 32) | fraction


def from_ntp(stamp: int) -> float:
    """NTP 64-bit timestamp -> Unix seconds (era 0; fine until 2036)."""
    return (stamp >> 32) - NTP_UNIX_DELTA + (stamp & 0xFFFFFFFF) / (1 << 32)


def encode_request(transmit: int) -> bytes:
    """A client request whose transmit timestamp is ``transmit`` (NTP format)."""
    first = (_VERSION << 3) | _MODE_CLIENT  # leap indicator 0
    return _HEADER.pack(first, 0, 0, 0, 0, 0, b"\0\0\0\0", 0, 0, 0, transmit)


@dataclass(frozen=True)
class Answer:
    """A server's answer, with the client's send and receive times (Unix seconds)."""

    stratum: int
    reference_id: str
    originate: float  # T1: client sent
    receive: float  # T2: server received
    transmit: float  # T3: server sent
    arrival: float  # T4: client received

    @property
    def offset(self) -> float:
        """How far the client's clock is behind the server's (add it to correct)."""
        return ((self.receive - self.originate) + (self.transmit - self.arrival)) / 2

    @property
    def delay(self) -> float:
        """Round-trip time, minus the time the server held the request."""
        return (self.arrival - self.originate) - (self.transmit - self.receive)


def _reference_id(stratum: int, raw: bytes) -> str:
    if stratum <= 1:  # a kiss code or a reference clock's ASCII name
        return raw.rstrip(b"\0").decode("ascii", "replace")
    return ".".join(str(b) for b in raw)


def decode_answer(data: bytes, sent: int, arrival: float) -> Answer:
    """Check a server's answer to the request sent with transmit timestamp ``sent``.

    Raises :class:`SntpError` for a short packet, a mode that is not "server", a
    server that says it is not synchronised, a kiss-o'-death (stratum 0: the server asks
    us to go away, e.g. ``RATE``), an originate timestamp that is not ours, or a zero
    transmit timestamp.
    """
    if len(data) < PACKET_SIZE:
        raise SntpError(f"answer of {len(data)} bytes; an NTP packet has at least {PACKET_SIZE}")
    first, stratum, _poll, _precision, _delay, _dispersion, ref, _reftime, origin, recv, xmit = (
        _HEADER.unpack_from(data)
    )
    leap, mode = first >> 6, first & 0x7
    if mode != _MODE_SERVER:
        raise SntpError(f"answer has mode {mode}, not {_MODE_SERVER} (server)")
    if stratum == 0:
        raise SntpError(f"server sent kiss code {_reference_id(0, ref)!r}: it refuses to serve")
    if leap == _LEAP_UNSYNCHRONIZED or stratum > 15:
        raise SntpError(f"server is not synchronised (leap {leap}, stratum {stratum})")
    if origin != sent:
        raise SntpError("answer does not echo our request's transmit time: not ours")
    if xmit == 0:
        raise SntpError("answer has no transmit time")
    return Answer(
        stratum=stratum,
        reference_id=_reference_id(stratum, ref),
        originate=from_ntp(sent),
        receive=from_ntp(recv),
        transmit=from_ntp(xmit),
        arrival=arrival,
    )
