"""Node health: the checks ``basaltctl health`` reports (and later, boot assessment)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from basalt.machinery.api import API_PORT

if TYPE_CHECKING:
    from .node import Node


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str


async def _api_answers(node: Node) -> Check:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(node.address, API_PORT), 2)
    except (OSError, TimeoutError) as exc:
        return Check("api", False, f"{node.address}:{API_PORT} does not accept connections: {exc}")
    writer.close()
    await writer.wait_closed()
    return Check("api", True, f"serving on {node.address}:{API_PORT}")


def stage_check(node: Node) -> Check:
    ok = node.stage == "running"
    return Check("stage", ok, f"node is {node.stage}")


def _services(node: Node) -> list[Check]:
    checks = []
    for status in node.supervisor.statuses():
        if status.state == "skipped":
            checks.append(Check(f"service {status.id}", True, f"skipped: {status.message}"))
            continue
        ok = status.state == "running" and status.health != "unhealthy"
        text = f"{status.state}, {status.health}" + (
            f": {status.message}" if status.message else ""
        )
        checks.append(Check(f"service {status.id}", ok, text))
    return checks


def _members(node: Node) -> Check:
    if node.config is None:
        return Check("members", False, "no config")
    me = node.members.get(node.hostname)
    if me is None:
        return Check("members", False, "this node is not in the member list yet")
    age = time.time() - me.last_seen
    limit = node.tuning.member_ttl
    return Check("members", age < limit, f"{len(node.members)} members; announced {age:.0f}s ago")


def _controllers(node: Node) -> Check:
    errors = node.engine.errors if node.engine else {}
    if errors:
        return Check("controllers", False, "; ".join(f"{k}: {v}" for k, v in errors.items()))
    return Check("controllers", True, "all reconciled")


#: Members' applied raft indexes may differ this much and still count as converged.
RAFT_LAG = 1000


async def _etcd(node: Node) -> list[Check]:
    """On control planes: every member healthy, one leader, raft indexes converging."""
    from .etcd.manager import manager_of

    manager = manager_of(node)
    if manager is None or not manager.running():
        return []
    import grpc.aio

    from .etcd.client import member_id_text

    try:
        async with manager.client(timeout=2.0) as client:
            members = await client.members()
    except grpc.aio.AioRpcError as exc:
        return [Check("etcd members", False, f"cannot list members: {exc.details()}")]
    leaders: set[int] = set()
    applied: dict[str, int] = {}
    problems = []
    for member in members:
        name = member.name or member_id_text(member.ID)
        if not member.clientURLs:
            problems.append(f"{name}: not started")
            continue
        try:
            async with manager.client(member.clientURLs[0], timeout=2.0) as peer:
                status = await peer.status()
        except grpc.aio.AioRpcError as exc:
            problems.append(f"{name}: unreachable ({exc.code().name})")
            continue
        if status.errors:
            problems.append(f"{name}: {'; '.join(status.errors)}")
        leaders.add(status.leader)
        applied[name] = status.raftAppliedIndex
    spread = max(applied.values()) - min(applied.values()) if applied else 0
    return [
        Check(
            "etcd members",
            not problems,
            f"{len(members)} members"
            + (f"; {', '.join(problems)}" if problems else ", all healthy"),
        ),
        Check(
            "etcd leader",
            len(leaders) == 1 and 0 not in leaders,
            f"leader {member_id_text(next(iter(leaders)))}"
            if len(leaders) == 1
            else f"members disagree on the leader ({len(leaders)} answers)",
        ),
        Check("etcd raft", spread <= RAFT_LAG, f"applied indexes within {spread} of each other"),
    ]


async def run_checks(node: Node, *, cluster_etcd: bool = True) -> list[Check]:
    """Every check; ``cluster_etcd`` False leaves out the cluster-wide etcd checks (each
    connects to every member) for a caller that judges only its own member."""
    return [
        stage_check(node),
        await _api_answers(node),
        *_services(node),
        *(await _etcd(node) if cluster_etcd else []),
        _members(node),
        _controllers(node),
    ]
