"""The service's limits, and the token bucket that enforces a client's request rate.

Every refusal names the limit (its ``--limit`` name) and its value, so an operator can
tell a flood from a cluster that outgrew the defaults and raise one with
``basalt-discovery serve --limit NAME=VALUE``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from basalt.machinery.discovery.errors import DiscoveryLimitError, DiscoveryRequestError


@dataclass(frozen=True)
class Limits:
    """What one cluster and one client (a peer address) may use. Sizes are bytes."""

    #: Live affiliates (nodes) in one cluster.
    affiliates_per_cluster: int = 100
    #: Sealed endpoints of one affiliate (after de-duplication).
    endpoints_per_affiliate: int = 32
    #: One affiliate's sealed data.
    data_size: int = 16 * 1024
    #: One sealed endpoint.
    endpoint_size: int = 256
    #: The longest time to live a record may ask for (seconds).
    ttl_max: int = 24 * 3600
    #: The time to live of a record that asks for none (seconds).
    ttl_default: int = 1800
    #: Clusters the service holds at once (each with at least one affiliate or watch).
    clusters: int = 100_000
    #: Bytes of sealed data and endpoints held across all clusters (memory, snapshot).
    total_size: int = 1 << 30
    #: Open watches of one cluster.
    watches_per_cluster: int = 500
    #: Requests per second of one client address (sustained), and its burst.
    client_rate: float = 50.0
    client_burst: int = 200
    #: Open watches of one client address.
    watches_per_client: int = 200
    #: Changes queued for one watch before the service drops it as too slow.
    watch_queue: int = 256

    def replace(self, assignments: list[str]) -> Limits:
        """This with ``NAME=VALUE`` overrides (the ``--limit`` option); a clear error
        naming the known limits for a wrong name or value."""
        names = {f.name: f.type for f in dataclasses.fields(self)}
        changes: dict[str, float | int] = {}
        for text in assignments:
            name, sep, value = text.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in names:
                raise DiscoveryRequestError(
                    f"--limit {text!r}: not NAME=VALUE with a known NAME",
                    hint="limits: " + ", ".join(sorted(names)),
                )
            try:
                number: float | int = float(value) if name == "client_rate" else int(value)
            except ValueError:
                raise DiscoveryRequestError(f"--limit {name}: {value!r} is not a number") from None
            if number <= 0:
                raise DiscoveryRequestError(f"--limit {name}: must be positive, not {value}")
            changes[name] = number
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


class LimitReached(DiscoveryLimitError):
    """A count or rate limit was reached (RESOURCE_EXHAUSTED); ``limit`` is its name."""

    def __init__(self, limit: str, value: float | int, what: str) -> None:
        shown = int(value) if value == int(value) else value
        super().__init__(
            f"limit {limit}={shown} reached: {what}",
            hint=f"the operator can raise it with --limit {limit}=N (docs/discovery.md)",
        )
        self.limit = limit


class TooLarge(DiscoveryRequestError):
    """A field is over a size limit (INVALID_ARGUMENT: the request itself is wrong);
    ``limit`` is its name."""

    def __init__(self, limit: str, value: int, what: str) -> None:
        super().__init__(
            f"limit {limit}={value} exceeded: {what}",
            hint="send less; the limits are in docs/discovery.md",
        )
        self.limit = limit


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; one request takes one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst
