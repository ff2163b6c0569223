"""Rollouts in the fleet, decided against a real (SQLite) fleet database, a real release
repository and machines in memory (tests/fakes/rollout_nodes.py), with an injected
clock: waves open only on health, the error budget halts and yanks and rolls back, the
blast radius is the canary, the upgrade path is stepped, pauses stop new starts."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from basalt.fleet import rollouts as ro
from basalt.fleet.db import Cluster, Database, Machine, RebootSlot
from basalt.fleet.migrations import upgrade
from basalt.fleet.service import Conflict, FleetError, NotFound
from basalt.machinery.releases.repository import Repository
from tests.fakes.bundles import metal_bundle
from tests.fakes.rollout_nodes import FakeMachine, FakeNodes

T0 = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)
TEMPLATE = "apiVersion: fleet.basalt.dev/v1alpha1\nkind: Cluster\nname: {name}\n{updates}"


@dataclass
class Clock:
    now: dt.datetime = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@dataclass
class World:
    database: Database
    repo: Repository
    nodes: FakeNodes
    clock: Clock
    runner: ro.RolloutRunner

    def run(self, rollout_id: int, steps: int = 1, every: float = 1.0) -> None:
        async def go() -> None:
            for _ in range(steps):
                await self.runner.step(rollout_id)
                self.clock.advance(every)

        asyncio.run(go())

    def start(self, version: str, **policy: object) -> int:
        with self.database.session() as session:
            made = ro.create(
                session, "alice", version, "stable", self.repo.releases("stable"),
                policy=ro.Policy.model_validate({"soak": "10s", **policy}),
            )  # fmt: skip
            return made.id

    def state(self, rollout_id: int) -> dict[str, object]:
        with self.database.session() as session:
            return ro.detail(session, ro.get(session, rollout_id))


def _uuid(i: int) -> str:
    return f"00000000-0000-0000-0000-{i:012d}"


@pytest.fixture
def world(tmp_path: Path, keypair: tuple[str, str]) -> Iterator[World]:
    database = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(database.engine)
    repo = Repository.init(tmp_path / "repo")
    for version in ("0.1.3", "0.2.0", "0.2.1", "0.3.0"):
        bundle = metal_bundle(tmp_path, keypair, version, version.encode())
        via = "0.1.3" if version == "0.2.1" else ""
        repo.publish(bundle.source, version, "x86_64", "stable", via)
    machines = {}
    with database.session() as session:
        for index, name in enumerate(("a", "b")):
            session.add(
                Cluster(
                    name=name,
                    template=TEMPLATE.format(
                        name=name, updates="updates: {channel: stable}\n" if name else ""
                    ),
                    secrets=b"",
                    endpoint="https://127.0.0.1:6443",
                    status="ready",
                )
            )
            for j in range(4):
                uuid = _uuid(index * 10 + j)
                machines[uuid] = FakeMachine("0.1.0")
                session.add(
                    Machine(
                        uuid=uuid, state="allocated", cert_serial="x", join_token="t",
                        cluster=name, role="controlplane" if j < 3 else "worker",
                        labels={"canary": "yes"} if (index, j) == (0, 3) else {},
                        inventory={"version": "0.1.0"},
                    )
                )  # fmt: skip
    clock = Clock()
    nodes = FakeNodes(machines)
    runner = ro.RolloutRunner(database, nodes, repo.directory, now=clock)
    yield World(database, repo, nodes, clock, runner)
    database.engine.dispose()


def test_a_good_release_reaches_every_machine_wave_by_wave(world: World, webhook: str) -> None:
    rollout = world.start("0.2.0", waves=[50, 100], webhook=webhook)
    world.run(rollout, steps=3)
    first = world.state(rollout)
    started = [m for m in first["machineStates"] if m["state"] != "pending"]  # type: ignore[attr-defined]
    assert [m["wave"] for m in started] == [0]  # only the canary before it soaked
    assert started[0]["role"] == "worker"  # a worker canary: no quorum at stake
    world.run(rollout, steps=200)
    done = world.state(rollout)
    assert done["state"] == "done" and done["done"] == 8 and done["failed"] == 0
    assert all(m.version == "0.2.0" for m in world.nodes.machines.values())
    # FleetLock slots: one control plane of a cluster at a time, every slot given back.
    with world.database.session() as session:
        assert session.query(RebootSlot).count() == 0
    assert world.nodes.most_down <= 2  # one per cluster (workers' group: one slot too)
    assert [(h["event"], h["done"]) for h in _Hook.received] == [("done", 8)]


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()


@pytest.fixture
def webhook() -> Iterator[str]:
    _Hook.received.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def test_a_broken_release_halts_at_the_canary_yanks_and_is_not_offered_again(
    world: World, webhook: str
) -> None:
    world.nodes.broken.add("0.3.0")
    rollout = world.start("0.3.0", canary={"labels": {"canary": "yes"}}, webhook=webhook)
    world.run(rollout, steps=30)
    [told] = _Hook.received
    assert (told["event"], told["version"], told["failed"]) == ("halted", "0.3.0", 1)
    assert told["yanked"] == "stable/0.3.0" and "the canary failed" in told["reason"]
    found = world.state(rollout)
    assert found["state"] == "halted" and "the canary failed" in str(found["reason"])
    touched = [u for u, m in world.nodes.machines.items() if m.upgrades]
    assert touched == [_uuid(3)]  # the blast radius is the canary, nothing else
    assert [r.yanked for r in world.repo.releases("stable") if r.version == "0.3.0"] == [True]
    states = {m["state"] for m in found["machineStates"]}  # type: ignore[attr-defined]
    assert states == {"failed", "skipped"}
    with world.database.session() as session:
        assert ro.failed_versions(session, _uuid(3)) == {"0.3.0"}
        evidence = ro.evidence(session, "0.3.0", world.clock())
    assert evidence["fallbacks"] == 1


def test_the_error_budget_and_rollback_of_who_took_it(world: World) -> None:
    """A release that breaks control planes only: the canary (a worker) passes, the next
    wave breaks one machine, the budget of 0 halts, and the worker that took it goes back."""
    world.nodes.broken.add("0.2.0")
    worker = _uuid(3)

    async def fine_on_workers(uuid: str, cluster: str, bundle: Path) -> str:
        if uuid == worker:
            world.nodes.broken.discard("0.2.0")
        try:
            return await FakeNodes.upgrade(world.nodes, uuid, cluster, bundle)
        finally:
            world.nodes.broken.add("0.2.0")

    world.nodes.upgrade = fine_on_workers  # type: ignore[method-assign]
    rollout = world.start("0.2.0", canary={"machines": [worker]}, waves=[100], maxFailures=0)
    world.run(rollout, steps=80)
    found = world.state(rollout)
    assert found["state"] == "halted"
    assert world.nodes.machines[worker].rollbacks == 1
    assert world.nodes.machines[worker].version == "0.1.0"
    by_uuid = {m["uuid"]: m["state"] for m in found["machineStates"]}  # type: ignore[attr-defined]
    assert by_uuid[worker] == "rolled-back"
    assert list(by_uuid.values()).count("failed") == 1


def test_a_multi_hop_path_is_stepped_per_machine(world: World) -> None:
    rollout = world.start("0.2.1", waves=[100], canary={"count": 1})
    world.run(rollout, steps=300)
    assert world.state(rollout)["state"] == "done"
    assert {tuple(m.upgrades) for m in world.nodes.machines.values()} == {("0.1.3", "0.2.1")}


def test_pause_windows_and_refusals(world: World) -> None:
    closed = {"cron": "0 3 * * *", "duration": "1h"}  # T0 is 12:00 UTC
    rollout = world.start("0.2.0", windows=[closed])
    world.run(rollout, steps=5)
    assert not any(m.upgrades for m in world.nodes.machines.values())
    world.clock.now = T0.replace(hour=3, minute=0)
    world.run(rollout, steps=2)
    assert sum(1 for m in world.nodes.machines.values() if m.upgrades) == 1
    with world.database.session() as session:
        ro.set_state(session, "bob", rollout, "pause")
        with pytest.raises(Conflict, match="is paused: it cannot pause"):
            ro.set_state(session, "bob", rollout, "pause")
    world.run(rollout, steps=30)
    assert sum(1 for m in world.nodes.machines.values() if m.upgrades) == 1  # no new starts
    with world.database.session() as session:
        with pytest.raises(Conflict, match=f"rollout {rollout} .* is paused on a, b"):
            ro.create(session, "al", "0.2.1", "stable", world.repo.releases("stable"))
        with pytest.raises(NotFound, match=r"9\.9\.9 is not in channel stable"):
            ro.create(session, "al", "9.9.9", "stable", world.repo.releases("stable"))
        ro.set_state(session, "bob", rollout, "abort")
    policy = ro.Policy.model_validate({"canary": {"machines": [_uuid(99)]}})
    releases = world.repo.releases("stable")
    with (
        world.database.session() as session,
        pytest.raises(FleetError, match=r"canary\.machines: .* not in the rollout"),
    ):
        ro.create(session, "al", "0.2.1", "stable", releases, policy=policy)
    with pytest.raises(ValueError, match="the last wave must be 100"):
        ro.Policy.model_validate({"waves": [10, 50]})


def test_a_halt_rolls_control_planes_back_one_at_a_time(world: World) -> None:
    """Three control planes of cluster a run the release when the rollout halts: they go
    back one after the other, each with its cluster's control-plane slot."""
    from basalt.fleet.db import RolloutMachine

    rollout = world.start("0.2.0", waves=[100])
    cps = [_uuid(i) for i in range(3)]
    with world.database.session() as session:
        for row in session.query(RolloutMachine).filter(RolloutMachine.uuid.in_(cps)):
            row.state, row.target, row.healthy = "done", "0.2.0", T0
    for uuid in cps:
        world.nodes.machines[uuid].version, world.nodes.machines[uuid].previous = "0.2.0", "0.1.0"
    asyncio.run(world.runner.halt(rollout, "an operator's test"))
    world.run(rollout, steps=20)
    assert world.nodes.most_down == 1
    assert [world.nodes.machines[u].version for u in cps] == ["0.1.0"] * 3
    states = {m["uuid"]: m["state"] for m in world.state(rollout)["machineStates"]}  # type: ignore[attr-defined]
    assert [states[u] for u in cps] == ["rolled-back"] * 3
    with world.database.session() as session:
        assert session.query(RebootSlot).count() == 0
        assert world.runner._active() == []  # nothing left to do
