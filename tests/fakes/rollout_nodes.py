"""Machines as a rollout runner sees them, in memory: for unit tests of
:class:`basalt.fleet.rollouts.RolloutRunner` (the real ones are ``operations.Nodes``
through machines' links, tested in tests/integration/test_rollouts.py).

An upgrade to a version in ``broken`` comes back on the old version with a fallback
recorded; any other reports the new version on trial for one look, then good."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class FakeMachine:
    version: str
    on_trial: int = 0  # looks left while on trial
    fell_back_from: str = ""
    previous: str = ""
    upgrades: list[str] = field(default_factory=list)
    rollbacks: int = 0


@dataclass
class FakeNodes:
    machines: dict[str, FakeMachine]
    broken: set[str] = field(default_factory=set)
    not_ready: set[str] = field(default_factory=set)
    #: Upgrades in flight at once, per cluster role, at their highest.
    down: set[str] = field(default_factory=set)
    most_down: int = 0

    async def resource(self, uuid: str, cluster: str, kind: str, rid: str) -> dict[str, Any]:
        machine = self.machines[uuid]
        if kind == "MachineStatuses":
            return {"ready": uuid not in self.not_ready}
        assert kind == "BootStatuses"
        trial = machine.on_trial > 0
        if trial:
            machine.on_trial -= 1
        else:
            self.down.discard(uuid)
        return {
            "version": machine.version,
            "onTrial": trial,
            "fellBackFrom": machine.fell_back_from,
            "previousVersion": machine.previous,
            "reason": "its gates failed" if machine.fell_back_from else "",
        }

    async def upgrade(self, uuid: str, cluster: str, bundle: Path) -> str:
        match = re.fullmatch(r"basalt-(.+)-x86_64\.tar", bundle.name)
        assert match is not None and bundle.is_file()
        version = match.group(1)
        machine = self.machines[uuid]
        machine.upgrades.append(version)
        self.down.add(uuid)
        self.most_down = max(self.most_down, len(self.down))
        if version in self.broken:
            machine.fell_back_from, machine.previous = "b", version
            machine.on_trial = 1
        else:
            machine.previous, machine.version = machine.version, version
            machine.fell_back_from, machine.on_trial = "", 1
        return f"installed {version}; rebooting"

    async def rollback(self, uuid: str, cluster: str) -> str:
        machine = self.machines[uuid]
        machine.rollbacks += 1
        machine.version, machine.previous = machine.previous, machine.version
        machine.on_trial = 1  # down until it is looked at again
        self.down.add(uuid)
        self.most_down = max(self.most_down, len(self.down))
        return f"rolled back to {machine.version}"

    async def peers_ready(self, peers: tuple[str, ...], cluster: str) -> str:
        busy = [p for p in peers if p in self.not_ready or p in self.down]
        return f"control plane {busy[0]} is not ready" if busy else ""
