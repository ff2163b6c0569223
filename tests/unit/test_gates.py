"""Health gates of a slot on trial (``basalt.machined.gates``): what they check, when."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from basalt.machined.assemble import build_node
from basalt.machined.gates import gate_checks, run_gates
from basalt.machined.node import Node, Tuning
from basalt.machined.platform import NodePaths, Platform, PlatformMode
from basalt.machinery.boot import GatesTimedOut


def _gates(root: Path, stage: str, **run: float) -> Any:
    """gate_checks (or run_gates with ``run``) of a container node at ``stage``."""

    async def go() -> Any:
        platform = Platform(PlatformMode.CONTAINER, NodePaths.under(root), "127.0.0.212", "n1")
        node = build_node(platform, Tuning())
        node.paths.create()
        node.set_stage(stage)
        try:
            return await (run_gates(node, **run) if run else gate_checks(node))
        finally:
            await node.stop_background()

    return asyncio.run(go())


def test_while_the_node_boots_only_its_stage_is_checked(tmp_path: Path) -> None:
    checks = _gates(tmp_path, "booting")
    assert [(c.name, c.ok, c.message) for c in checks] == [("stage", False, "node is booting")]


def test_once_running_every_gate_but_the_cluster_wide_etcd_checks(tmp_path: Path) -> None:
    names = [c.name for c in _gates(tmp_path, "running")]
    assert names[:2] == ["stage", "api"] and "members" in names and "controllers" in names
    assert not {"etcd members", "etcd leader", "etcd raft"} & set(names)


def test_a_timeout_names_the_gates_still_failing(tmp_path: Path) -> None:
    # Nothing serves the node's API address: the api gate fails until the timeout.
    result = _gates(tmp_path, "running", timeout=0.3, poll=0.1)
    assert isinstance(result, GatesTimedOut)
    assert any(w.startswith("api: 127.0.0.212:") for w in result.waiting_for)


def test_gates_that_crash_count_as_a_failed_try(tmp_path: Path, monkeypatch) -> None:
    """An exception in the gates (a bug in the new slot) must not leave it on trial for
    ever: it is recorded as failed gates, and the node reboots for its next try."""
    from dataclasses import replace

    from basalt.machined import gates, upgrade
    from basalt.machinery.boot import Boot, Install, SlotName, apply, initial_state

    async def crash(node: Node, timeout: float) -> Any:
        raise TypeError("run_checks() got an unexpected keyword argument")

    monkeypatch.setattr(gates, "run_gates", crash)
    reboots: list[bool] = []
    monkeypatch.setattr(upgrade.Upgrader, "_reboot", lambda self: reboots.append(True))

    async def go() -> Any:
        platform = Platform(PlatformMode.CONTAINER, NodePaths.under(tmp_path), "127.0.0.212", "n1")
        node = build_node(platform, Tuning())
        node.paths.create()
        try:
            state = replace(initial_state("0.1.0"), booted=SlotName.A)
            state = apply(apply(state, Install("0.2.0")).state, Boot()).state
            node.upgrader.require_slots().save(state)
            await node.upgrader._assess()
            return node.upgrader.require_slots().load()
        finally:
            await node.stop_background()

    state = asyncio.run(go())
    assert reboots == [True]
    slot_b = state.slot(SlotName.B)
    assert "the health gates crashed: TypeError: run_checks() got an unexpected" in str(slot_b)
