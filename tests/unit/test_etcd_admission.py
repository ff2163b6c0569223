"""Basalt's own etcd reconfiguration check (machined.etcd.admission), which stands in for
etcd's strict check: decisions from the members and what each voter answered now."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from basalt.machined.etcd import admission
from basalt.machined.etcd.admission import HEALTHY


@dataclass(frozen=True)
class M:
    ID: int
    name: str
    isLearner: bool = False


CP1, CP2, CP3 = M(1, "cp1"), M(2, "cp2"), M(3, "cp3")
LEARNER = M(9, "cp9", isLearner=True)


def healthy(*members: M) -> dict[int, str]:
    return {m.ID: HEALTHY for m in members}


@pytest.mark.parametrize(("voters", "quorum"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)])
def test_majority(voters: int, quorum: int) -> None:
    assert admission.majority(voters) == quorum


def test_a_learner_joins_a_cluster_whose_voters_are_all_healthy() -> None:
    assert admission.add_refusal([CP1], healthy(CP1)) is None
    assert admission.add_refusal([CP1, CP2], healthy(CP1, CP2)) is None


def test_a_learner_waits_while_any_voter_is_unhealthy_naming_it() -> None:
    health = {**healthy(CP1), CP2.ID: "unreachable (UNAVAILABLE)"}
    why = admission.add_refusal([CP1, CP2, CP3], health)
    assert why == ("voting members not healthy (cp2: unreachable (UNAVAILABLE), cp3: not probed)")


def test_learners_do_not_count_for_adding() -> None:
    # A learner that does not answer is no reason to hold back the next one (etcd will
    # refuse while it is a learner: one at a time).
    assert admission.add_refusal([CP1, LEARNER], healthy(CP1)) is None
    assert admission.add_refusal([LEARNER], {}) == "the cluster has no voting member"


def test_a_learner_is_promoted_when_a_majority_stays_healthy() -> None:
    # 1 voter + learner -> 2 voters, both needed: the voter is healthy.
    assert admission.promote_refusal([CP1, LEARNER], LEARNER.ID, healthy(CP1)) is None
    # 2 voters + learner -> 3, 2 needed: one healthy voter and the learner suffice.
    health = {**healthy(CP1), CP2.ID: "unreachable (UNAVAILABLE)"}
    assert admission.promote_refusal([CP1, CP2, LEARNER], LEARNER.ID, health) is None


def test_a_promotion_that_would_cost_quorum_waits() -> None:
    # 3 voters + learner -> 4, 3 needed: only one voter healthy.
    health = {**healthy(CP1), CP2.ID: "unreachable (UNAVAILABLE)", CP3.ID: "NOSPACE"}
    why = admission.promote_refusal([CP1, CP2, CP3, LEARNER], LEARNER.ID, health)
    assert why is not None
    assert "2 healthy of 4 voters, 3 needed" in why
    assert "cp2: unreachable (UNAVAILABLE)" in why and "cp3: NOSPACE" in why


def test_removing_a_dead_member_is_allowed_when_the_rest_is_a_healthy_majority() -> None:
    health = {**healthy(CP1, CP2), CP3.ID: "unreachable (UNAVAILABLE)"}
    assert admission.remove_refusal([CP1, CP2, CP3], CP3.ID, health) is None


def test_removing_a_member_that_would_cost_quorum_is_refused() -> None:
    health = {**healthy(CP1), CP2.ID: "unreachable (UNAVAILABLE)", CP3.ID: HEALTHY}
    why = admission.remove_refusal([CP1, CP2, CP3], CP3.ID, health)
    assert why == (
        "removing cp3 would leave 1 healthy of 2 voters, 2 needed (cp2: unreachable (UNAVAILABLE))"
    )


def test_removing_a_learner_or_an_unknown_member_is_not_a_quorum_question() -> None:
    assert admission.remove_refusal([CP1, LEARNER], LEARNER.ID, {}) is None
    assert admission.remove_refusal([CP1], 42, {}) is None
    # etcd refuses to remove its last member itself.
    assert admission.remove_refusal([CP1], CP1.ID, {}) is None
