"""``DiscoveryConfig``: find this cluster's members through a discovery service.

The node publishes its affiliate (host name, machine type, addresses, Basalt version,
etcd peer URL on control planes) to the service, encrypted end to end with a key derived
from ``ClusterConfig.id`` and ``ClusterConfig.secret``, and watches the others'. The
service sees only opaque, expiring records; see docs/discovery.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from ..durations import parse_duration
from ._base import Document, register
from ._types import invalid

#: The shortest and longest record lifetime a node may ask for. Short TTLs are for tests:
#: a node refreshes its record every third of it.
MIN_TTL = 5.0
MAX_TTL = 24 * 3600.0


def _service_url(value: str) -> str:
    from ..discovery.client import parse_target
    from ..errors import BasaltError

    try:
        parse_target(value, "url")
    except BasaltError as exc:
        raise invalid(str(exc).removeprefix("url: "), exc.hint) from None
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
    ca: str = Field(
        "",
        description="PEM CA certificate(s) the service's certificate must chain to "
        "(`grpcs` URLs; empty: the system's CA store).",
    )

    def ttl_seconds(self) -> float:
        return parse_duration(self.ttl) or 1800.0
