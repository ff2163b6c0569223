"""When a joining control plane asks etcd again: pure decisions, no I/O.

A new learner is refused, for a while, for reasons that pass by themselves:

- another learner is still catching up (etcd takes one learner at a time): it passes the
  moment that learner is promoted, which takes well under a second on a small cluster;
- a voting member is not healthy (Basalt's own check before it asks etcd, see
  :mod:`.admission`): typically the previous joiner, between its promotion and its etcd
  answering Status;
- "unhealthy cluster": only when an operator turned etcd's strict reconfiguration check
  back on (``extraArgs``): the member asked has not been connected to every voting member
  for etcd's health interval (5 s) yet. It passes at a moment the member knows and we do not.

They are retried on a short step (the join is what the whole cluster waits for), while
other failures (a peer not answering) move on to the next peer. Promotion is retried from
a short step growing to a cap: a learner on a fresh cluster is in sync a few hundred
milliseconds after its etcd starts, and asking too early costs one cheap refusal.
"""

from __future__ import annotations

import enum


class Refusal(enum.Enum):
    """Why etcd did not take a new learner (from the MemberAdd error's details)."""

    #: Another member is a learner still; etcd takes one at a time.
    LEARNER_PENDING = "another learner is catching up"
    #: The member asked was not connected to every voter for etcd's health interval.
    RECONNECTING = "etcd's members have not all been connected for 5 s"
    #: Basalt's own check: a voting member did not answer healthy (see .admission).
    VOTERS_UNHEALTHY = "a voting member is not healthy"
    #: Anything else (the peer is down, not a member, an error we do not know).
    OTHER = "other"


def refusal(details: str | None) -> Refusal:
    text = (details or "").lower()
    if "too many learner" in text:
        return Refusal.LEARNER_PENDING
    if "unhealthy cluster" in text:
        return Refusal.RECONNECTING
    return Refusal.OTHER


#: Between join attempts while etcd refuses for a reason that passes by itself.
JOIN_STEP = 0.1
#: Between join rounds when no peer answered at all.
JOIN_IDLE = 0.25
#: Promotion: first ask after PROMOTE_FIRST, growing by PROMOTE_GROWTH up to PROMOTE_CAP.
PROMOTE_FIRST = 0.05
PROMOTE_GROWTH = 1.5
PROMOTE_CAP = 0.5


def join_delay(refusals: list[Refusal]) -> float:
    """How long to wait before the next join round, given this round's refusals."""
    if any(r is not Refusal.OTHER for r in refusals):
        return JOIN_STEP
    return JOIN_IDLE


def promote_delays() -> list[float]:
    """The waits before each promotion attempt until the cap (then the cap repeats)."""
    delays = [PROMOTE_FIRST]
    while delays[-1] < PROMOTE_CAP:
        delays.append(min(PROMOTE_CAP, delays[-1] * PROMOTE_GROWTH))
    return delays


def promote_delay(attempt: int) -> float:
    """The wait before promotion attempt ``attempt`` (0-based)."""
    delays = promote_delays()
    return delays[min(attempt, len(delays) - 1)]
