"""Discovery on the node's side: the cluster's keys, the sealed ``Affiliate`` record and
the client of a discovery service (the service itself is ``basalt.discovery``, never in a
node's image). The protocol is defined in :mod:`.crypto` and docs/discovery.md."""

from .client import DiscoveryClient, DiscoveryTarget, WatchEvent, WatchKind, parse_target
from .crypto import ClusterKeys, Proof
from .errors import (
    DiscoveryAuthError,
    DiscoveryDataError,
    DiscoveryError,
    DiscoveryLimitError,
    DiscoveryRequestError,
    DiscoveryTargetError,
)
from .model import Affiliate

__all__ = [
    "Affiliate",
    "ClusterKeys",
    "DiscoveryAuthError",
    "DiscoveryClient",
    "DiscoveryDataError",
    "DiscoveryError",
    "DiscoveryLimitError",
    "DiscoveryRequestError",
    "DiscoveryTarget",
    "DiscoveryTargetError",
    "Proof",
    "WatchEvent",
    "WatchKind",
    "parse_target",
]
