"""A DHCPv4 client (RFC 2131): DISCOVER, OFFER, REQUEST, ACK; renewal at T1, rebinding at T2.

:mod:`.packet` encodes and decodes messages and leases (pure); :mod:`.client` speaks
them on a link. See :class:`DhcpClient`.
"""

from .client import DhcpClient, DhcpTiming, LeaseCallback
from .packet import (
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

__all__ = [
    "DhcpClient",
    "DhcpDecodeError",
    "DhcpMessage",
    "DhcpTiming",
    "Lease",
    "LeaseCallback",
    "MessageType",
    "Option",
    "build_ipv4_udp",
    "discover",
    "parse_ipv4_udp",
    "request",
]
