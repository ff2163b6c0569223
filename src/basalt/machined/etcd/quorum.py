"""May this control plane go down for a while (an upgrade's reboot) without risking etcd?

Like :meth:`EtcdManager.check_leave`, but for a member that stays a member: while it is
down, the other voters must still form a majority of *all* voters, and every one of them
must be healthy now (an unhealthy member is a quorum loss waiting for this reboot).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .admission import majority
from .client import member_id_text
from .manager import QuorumError

if TYPE_CHECKING:
    from .manager import EtcdManager


async def check_reboot(manager: EtcdManager) -> str:
    """A note saying why going down is safe; raises QuorumError naming unhealthy members."""
    name = manager.name
    if not manager.running():
        return f"etcd is not running on {name}: its reboot cannot cost quorum"
    async with manager.client() as client:
        members = await client.members()
    me = next((m for m in members if manager.peer_url in m.peerURLs), None)
    if me is None or me.isLearner:
        return f"{name} is not a voting etcd member: its reboot cannot cost quorum"
    voters = [m for m in members if not m.isLearner]
    others = [m for m in voters if m.ID != me.ID]
    if not others:
        return f"{name} is the only etcd member: etcd is unavailable until it is back"
    health = await manager.health_of(others)
    unhealthy = [m for m in others if health[m.ID] != "healthy"]
    healthy = len(others) - len(unhealthy)
    needed = majority(len(voters))
    if unhealthy:
        report = ", ".join(f"{m.name or member_id_text(m.ID)}: {health[m.ID]}" for m in unhealthy)
        risk = (
            "would cost etcd quorum"
            if healthy < needed
            else "would leave etcd one failure from losing quorum"
        )
        raise QuorumError(
            f"taking {name} down {risk}: {healthy} of {len(others)} other members healthy, "
            f"{needed} of {len(voters)} voters needed; unhealthy: {report}",
            hint="fix the unhealthy members first (basaltctl etcd status), or pass --force",
        )
    return f"etcd quorum pre-check passed: {healthy} of {len(others)} other members healthy"
