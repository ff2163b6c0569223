"""Health gates: when a slot on trial has proven itself.

The gates are the node's health checks (:func:`.health.run_checks`: boot stage, API
serving, every service up, member list, controllers) with etcd judged for *this* member
only: on a control plane its etcd must be a voting member with a leader, caught up with
the leader's applied index. Another member's trouble must not roll this node back (the
cluster-wide etcd checks of ``basaltctl health`` are not even run). Until the boot has
finished only the stage is checked.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc.aio

from basalt.machinery.boot import GatesPassed, GatesTimedOut

from .health import RAFT_LAG, Check, run_checks, stage_check

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

#: Gates are polled this often while a slot is on trial (a few seconds per upgrade).
POLL = 0.25


async def etcd_member(node: Node) -> list[Check]:
    """Control planes: this node's etcd member is healthy, voting and caught up."""
    from .etcd.manager import manager_of

    manager = manager_of(node)
    if not node.is_controlplane:
        return []
    if manager is None or not manager.running():
        return [Check("etcd member", False, "etcd is not running")]
    try:
        async with manager.client(timeout=2.0) as client:
            members = await client.members()
            status = await client.status()
    except grpc.aio.AioRpcError as exc:
        return [Check("etcd member", False, f"local etcd does not answer ({exc.code().name})")]
    me = next((m for m in members if manager.peer_url in m.peerURLs), None)
    problem = None
    if me is None:
        problem = "this node is not an etcd member"
    elif me.isLearner:
        problem = "a learner, not yet a voting member"
    elif status.errors:
        problem = "; ".join(status.errors)
    elif not status.leader:
        problem = "no leader"
    else:
        leader = {m.ID: m for m in members}.get(status.leader)
        if leader is not None and leader.ID != me.ID and leader.clientURLs:
            try:
                async with manager.client(leader.clientURLs[0], timeout=2.0) as peer:
                    lead = await peer.status()
            except grpc.aio.AioRpcError as exc:
                return [Check("etcd member", False, f"leader unreachable ({exc.code().name})")]
            lag = lead.raftAppliedIndex - status.raftAppliedIndex
            if lag > RAFT_LAG:
                problem = f"{lag} entries behind the leader"
    if problem is not None:
        return [Check("etcd member", False, problem)]
    return [Check("etcd member", True, "voting, has a leader, caught up")]


async def gate_checks(node: Node) -> list[Check]:
    """The gates. Until the boot has finished only its stage is checked: the rest cannot
    pass yet, and checking them (TLS connections to etcd) would slow the boot itself."""
    stage = stage_check(node)
    if not stage.ok:
        return [stage]
    checks = await run_checks(node, cluster_etcd=False)
    return checks + await etcd_member(node)


async def run_gates(node: Node, timeout: float, poll: float = POLL) -> GatesPassed | GatesTimedOut:
    """Check until every gate passes (GatesPassed) or ``timeout`` runs out (GatesTimedOut,
    naming the gates that were still failing and why)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    waiting: set[str] = set()
    while True:
        failing = [c for c in await gate_checks(node) if not c.ok]
        if {c.name for c in failing} != waiting:  # say what the gates wait for, as it changes
            waiting = {c.name for c in failing}
            log.info(
                "health gates: %s",
                "; ".join(f"{c.name}: {c.message}" for c in failing) or "all passed",
            )
        if not failing:
            return GatesPassed()
        if loop.time() >= deadline:
            return GatesTimedOut(timeout, tuple(f"{c.name}: {c.message}" for c in failing))
        await asyncio.sleep(poll)
