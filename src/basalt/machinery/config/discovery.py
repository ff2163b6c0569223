"""``DiscoveryConfig``: find this cluster's members through a discovery service.

The node publishes its affiliate (host name, machine type, addresses, Basalt version,
etcd peer URL on control planes) to the service, encrypted end to end with a key derived
from ``ClusterConfig.id`` and ``ClusterConfig.secret``, and watches the others'. The
service sees only opaque, expiring records; see docs/discovery.md.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from ..durations import parse_duration
from ._base import Document, register
from ._types import invalid

#: The shortest and longest record lifetime a node may ask for. Short TTLs are for tests:
#: a node refreshes its record every third of it.
MIN_TTL = 5.0
MAX_TTL = 24 * 3600.0
SCHEMES = ("grpc", "grpcs")


def _service_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise invalid(
            f"{value!r} is not a grpc:// or grpcs:// URL with a host",
            "e.g. grpcs://discovery.example.com:3000 (grpc:// only on a trusted network: "
            "records are encrypted either way, the connection is not)",
        )
    try:
        port = parts.port
    except ValueError:
        raise invalid(f"{value!r} has an invalid port", "ports are 1-65535") from None
    if port is None:
        raise invalid(f"{value!r} has no port", f"e.g. {parts.scheme}://{parts.hostname}:3000")
    if parts.username or parts.password or parts.path.strip("/") or parts.query or parts.fragment:
        raise invalid(
            f"{value!r}: only SCHEME://HOST:PORT, no credentials, path, query or fragment",
            f"e.g. {parts.scheme}://{parts.hostname}:{port}",
        )
    return value


def _ttl(value: str) -> str:
    seconds = parse_duration(value)
    if seconds is None:
        raise invalid(f"{value!r} is not a duration", "e.g. 30m, 1h or 90s")
    if not MIN_TTL <= seconds <= MAX_TTL:
        raise invalid(f"{value!r} is out of range: between 5s and 24h", "e.g. 30m")
    return value


DiscoveryURL = Annotated[str, AfterValidator(_service_url)]
TTLText = Annotated[str, AfterValidator(_ttl)]


@register
class DiscoveryConfig(Document):
    """Cluster discovery: nodes find their cluster's members through a discovery service
    (``basalt-discovery``), with end-to-end encrypted, expiring records. ``get members``
    then lists them even when the control plane endpoint cannot be reached, and a new
    control plane finds etcd through it."""

    kind: Literal["DiscoveryConfig"] = Field(description="`DiscoveryConfig`.")
    enabled: bool = Field(
        True, description="Publish this node and watch the others; `false` turns it off."
    )
    url: DiscoveryURL = Field(
        description="The discovery service: `grpcs://HOST:PORT` (TLS) or `grpc://HOST:PORT`."
    )
    ttl: TTLText = Field(
        "30m",
        description="How long the service keeps this node's record without a refresh "
        "(between 5s and 24h); the node refreshes it every third of that.",
    )

    def ttl_seconds(self) -> float:
        return parse_duration(self.ttl) or 1800.0
