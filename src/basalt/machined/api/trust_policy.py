"""What the trust service may sign and which announcements it believes: pure decisions.

The join token is in every ``worker.yaml``, so many people and machines hold it; whatever
it buys must not let its holder pose as someone else. So:

- A certificate is signed only for names that belong to the requester: the host name in
  its request and the names and addresses it asks for, none of which may be in use by
  anyone else — this control plane (its address, host name and certificate names), the
  cluster endpoint, another member, or a node the service signed for earlier.
- Certificates it signs carry :data:`WORKER_UNIT` (an OrganizationalUnit: API roles come
  from the Organization only), so their holders can only ever be workers.
- A member is what the certificate it presents says: its id is the certificate's common
  name, its addresses must be IP names of that certificate, and a worker certificate makes
  a worker. A name is never taken from the request alone.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: The OrganizationalUnit of every certificate the trust service signs.
WORKER_UNIT = "basalt:worker"


class TrustRefusal(Exception):
    """The request asks for something that is not the requester's; says what and whose."""


@dataclass(frozen=True)
class Owner:
    """Who uses a name: a description for refusals, and the host name (to let a node
    renew its own names)."""

    description: str
    hostname: str = ""


def normalise(name: str) -> str:
    """Names compare case-insensitively; addresses in their canonical form."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower().rstrip(".")


def taken_names(
    own_hostname: str,
    own_names: Iterable[str],
    endpoint_host: str,
    members: Mapping[str, Iterable[str]],
    issued: Mapping[str, Iterable[str]],
) -> dict[str, Owner]:
    """Every name in use, and by whom: this control plane, the cluster endpoint, each
    member (id -> its names) and each node signed for before (host name -> its names)."""
    taken: dict[str, Owner] = {}
    for hostname, names in (*issued.items(), *members.items()):
        for name in (hostname, *names):
            taken.setdefault(normalise(name), Owner(f"node {hostname}", hostname))
    if endpoint_host:
        taken[normalise(endpoint_host)] = Owner("the cluster endpoint")
    for name in (own_hostname, *own_names):
        taken[normalise(name)] = Owner(f"control plane {own_hostname}", "")
    return taken


def names_to_sign(hostname: str, requested: Iterable[str], taken: Mapping[str, Owner]) -> list[str]:
    """The names to put in the certificate of ``hostname``: its host name and each
    requested name, every one of them free or already ``hostname``'s own. Raises
    :class:`TrustRefusal` naming the first name that belongs to someone else."""
    wanted = list(dict.fromkeys([hostname, *requested]))
    for name in wanted:
        owner = taken.get(normalise(name))
        if owner is not None and owner.hostname != hostname:
            what = "address" if _is_ip(name) else "name"
            raise TrustRefusal(f"{what} {name} is used by {owner.description}")
        if _is_ip(name) and not _assignable(name):
            raise TrustRefusal(f"address {name} cannot belong to one node")
    return wanted


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _assignable(name: str) -> bool:
    address = ipaddress.ip_address(name)
    if address == ipaddress.ip_address("127.0.0.1") or address == ipaddress.ip_address("::1"):
        return False  # every machine's own loopback
    return not (address.is_unspecified or address.is_multicast or address.is_link_local)


@dataclass(frozen=True)
class Presented:
    """What a certificate presented with an announcement says (already verified to be
    issued by the OS CA and valid now)."""

    common_name: str
    ip_names: frozenset[str]
    worker: bool


def check_announcement(
    member_id: str, hostname: str, machine_type: str, addresses: Iterable[str], cert: Presented
) -> None:
    """Refuse (:class:`TrustRefusal`) an announcement its certificate does not back."""
    if member_id != cert.common_name or hostname != cert.common_name:
        raise TrustRefusal(f"member {member_id!r} presents the certificate of {cert.common_name!r}")
    for address in addresses:
        if normalise(address) not in cert.ip_names:
            raise TrustRefusal(
                f"address {address} of member {member_id!r} is not in its certificate"
            )
    if cert.worker and machine_type != "worker":
        raise TrustRefusal(f"member {member_id!r} holds a worker certificate, not a {machine_type}")


@dataclass
class FailureLimiter:
    """Wrong join tokens per peer: up to ``burst`` in ``window`` seconds are answered
    (and reported once per window); beyond that the peer is refused before any work."""

    burst: int = 10
    window: float = 60.0
    _failures: dict[str, list[float]] = field(default_factory=dict)
    _reported: dict[str, float] = field(default_factory=dict)
    #: At most this many peers are tracked (the oldest are forgotten first).
    max_peers: int = 4096

    def _recent(self, peer: str, now: float) -> list[float]:
        recent = [t for t in self._failures.get(peer, []) if now - t < self.window]
        if recent:
            self._failures[peer] = recent
        else:
            self._failures.pop(peer, None)
        return recent

    def blocked(self, peer: str, now: float | None = None) -> float:
        """Seconds until ``peer`` may try again (0: it may now)."""
        now = time.monotonic() if now is None else now
        recent = self._recent(peer, now)
        if len(recent) < self.burst:
            return 0.0
        return max(0.0, self.window - (now - recent[0]))

    def failed(self, peer: str, now: float | None = None) -> int | None:
        """Record a failure; the number of failures to report now (once per window per
        peer, so a flood cannot push other events out of the history), else None."""
        now = time.monotonic() if now is None else now
        if peer not in self._failures and len(self._failures) >= self.max_peers:
            self._failures.pop(next(iter(self._failures)))
        self._failures.setdefault(peer, []).append(now)
        last = self._reported.get(peer)
        if last is not None and now - last < self.window:
            return None
        if len(self._reported) >= self.max_peers:
            self._reported.pop(next(iter(self._reported)))
        self._reported[peer] = now
        return len(self._recent(peer, now))
