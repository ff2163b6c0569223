"""When a joining control plane asks etcd again (machined.etcd.pacing): from etcd's own
refusal messages (3.4; "unhealthy cluster" only with its strict reconfiguration check turned
back on) and Basalt's own check to the next wait."""

from __future__ import annotations

import pytest

from basalt.machined.etcd import pacing
from basalt.machined.etcd.pacing import Refusal

# The details etcd 3.4 sends with MemberAdd refusals (etcdserver/api/v3rpc/rpctypes).
TOO_MANY_LEARNERS = "etcdserver: too many learner members in cluster"
UNHEALTHY = "etcdserver: unhealthy cluster"


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        (TOO_MANY_LEARNERS, Refusal.LEARNER_PENDING),
        (UNHEALTHY, Refusal.RECONNECTING),
        ("failed to connect to all addresses", Refusal.OTHER),
        ("etcdserver: Peer URLs already exists", Refusal.OTHER),
        ("", Refusal.OTHER),
        (None, Refusal.OTHER),
    ],
)
def test_refusals_are_read_from_etcds_messages(details: str | None, expected: Refusal) -> None:
    assert pacing.refusal(details) is expected


@pytest.mark.parametrize(
    ("refusals", "delay"),
    [
        ([Refusal.LEARNER_PENDING], pacing.JOIN_STEP),
        ([Refusal.OTHER, Refusal.RECONNECTING], pacing.JOIN_STEP),
        ([Refusal.VOTERS_UNHEALTHY], pacing.JOIN_STEP),
        ([Refusal.OTHER, Refusal.OTHER], pacing.JOIN_IDLE),
        ([], pacing.JOIN_IDLE),
    ],
)
def test_a_refusal_that_passes_by_itself_is_asked_again_sooner(
    refusals: list[Refusal], delay: float
) -> None:
    assert pacing.join_delay(refusals) == delay
    assert pacing.JOIN_STEP < pacing.JOIN_IDLE


def test_promotion_asks_early_then_backs_off_to_the_cap() -> None:
    delays = [pacing.promote_delay(attempt) for attempt in range(20)]
    assert delays[0] == pacing.PROMOTE_FIRST
    assert delays == sorted(delays)
    assert delays[-1] == pacing.PROMOTE_CAP
    # The learner is promoted within a second of being in sync: the first second holds
    # several attempts, and no wait is ever longer than the cap.
    first_second = 0.0
    attempts = 0
    while first_second + delays[attempts] <= 1.0:
        first_second += delays[attempts]
        attempts += 1
    assert attempts >= 5
    assert max(delays) <= pacing.PROMOTE_CAP
