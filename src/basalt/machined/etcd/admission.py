"""Basalt's own reconfiguration check: may etcd's membership change now? Pure decisions.

We run etcd with ``--strict-reconfig-check=false`` (docs/adr/0024-etcd-reconfiguration.md).
etcd 3.4's strict check protects quorum with two rules, and one of them is a clock: a new
member (even a learner, which never votes) is refused until the member asked has been
connected to every voting member for 5 s. On a forming cluster that clock is most of the
time to three voters. The other rule, and what the clock stands for, are checked here
instead, from what every voter answers right now (``EtcdManager.health_of``: a Status
call, "healthy" or the reason it is not):

- **add a learner**: every voting member is healthy. A learner does not vote, so adding
  one cannot cost quorum; a cluster with a sick voter is not one to grow.
- **promote a learner**: the voters that are healthy now, plus the learner, are a
  majority of the voters it will have. (etcd itself still refuses a learner that has not
  caught up with the leader: that check does not depend on the strict flag.)
- **remove a member**: the voters that stay and are healthy now are a majority of the
  voters that stay.

Each returns None when the change may go ahead, else a sentence naming the members in
the way; the callers wait and ask again (a join, a promotion) or refuse the request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from .client import member_id_text

HEALTHY = "healthy"


class Member(Protocol):
    """What the checks read of an etcd member (etcd_pb2.Member has it)."""

    @property
    def ID(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def isLearner(self) -> bool: ...


def majority(voters: int) -> int:
    """Votes a raft group of ``voters`` members needs for quorum."""
    return voters // 2 + 1


def _label(member: Member) -> str:
    return member.name or member_id_text(member.ID)


def _unhealthy(members: Sequence[Member], health: Mapping[int, str]) -> list[str]:
    return [
        f"{_label(m)}: {health.get(m.ID, 'not probed')}"
        for m in members
        if health.get(m.ID) != HEALTHY
    ]


def _voters(members: Sequence[Member]) -> list[Member]:
    return [m for m in members if not m.isLearner]


def add_refusal(members: Sequence[Member], health: Mapping[int, str]) -> str | None:
    """Why a learner may not be added now (None: it may)."""
    voters = _voters(members)
    if not voters:
        return "the cluster has no voting member"
    sick = _unhealthy(voters, health)
    if sick:
        return f"voting members not healthy ({', '.join(sick)})"
    return None


def promote_refusal(
    members: Sequence[Member], learner_id: int, health: Mapping[int, str]
) -> str | None:
    """Why learner ``learner_id`` may not become a voter now (None: it may)."""
    voters = _voters(members)
    healthy = sum(1 for m in voters if health.get(m.ID) == HEALTHY)
    after = len(voters) + 1
    if healthy + 1 < majority(after):
        sick = ", ".join(_unhealthy(voters, health))
        return (
            f"promoting {member_id_text(learner_id)} would leave {healthy + 1} healthy of "
            f"{after} voters, {majority(after)} needed ({sick})"
        )
    return None


def remove_refusal(
    members: Sequence[Member], target_id: int, health: Mapping[int, str]
) -> str | None:
    """Why member ``target_id`` may not be removed now (None: it may)."""
    target = next((m for m in members if target_id == m.ID), None)
    if target is None or target.isLearner:
        return None  # a learner never counted towards quorum
    staying = [m for m in _voters(members) if target_id != m.ID]
    if not staying:
        return None  # etcd itself refuses to remove its last member
    healthy = sum(1 for m in staying if health.get(m.ID) == HEALTHY)
    if healthy < majority(len(staying)):
        return (
            f"removing {_label(target)} would leave {healthy} healthy of {len(staying)} voters, "
            f"{majority(len(staying))} needed ({', '.join(_unhealthy(staying, health))})"
        )
    return None
