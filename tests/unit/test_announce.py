"""When a node announces itself again (controllers.members.announce_delay): soon while
a forming cluster's answer lists no other control plane, else every interval."""

from __future__ import annotations

from basalt.machined.controllers.members import FORMING, announce_delay
from basalt.machinery.api import trust_pb2


def member(hostname: str, machine_type: str) -> trust_pb2.Member:
    return trust_pb2.Member(id=hostname, hostname=hostname, machine_type=machine_type)


CP1, CP2, W1 = member("cp1", "controlplane"), member("cp2", "controlplane"), member("w1", "worker")


def test_an_answer_without_another_control_plane_is_asked_again_soon() -> None:
    # cp2 started before cp1 had announced itself: the answer lists cp2 (and a worker).
    assert announce_delay([CP2, W1], "cp2", 10.0, elapsed=0.5) == 1.0
    assert announce_delay([], "w1", 10.0, elapsed=3.0) == 1.0


def test_once_another_control_plane_is_listed_the_interval_applies() -> None:
    assert announce_delay([CP1, CP2], "cp2", 10.0, elapsed=0.5) == 10.0
    assert announce_delay([CP1, W1], "w1", 10.0, elapsed=0.5) == 10.0


def test_a_lone_control_plane_stops_asking_often_after_the_forming_window() -> None:
    assert announce_delay([CP1], "cp1", 10.0, elapsed=FORMING - 1) == 1.0
    assert announce_delay([CP1], "cp1", 10.0, elapsed=FORMING) == 10.0


def test_a_short_interval_is_never_stretched() -> None:
    assert announce_delay([CP1], "cp1", 0.2, elapsed=0.0) == 0.2
