"""EtcdMembers and EtcdStatuses resources, refreshed while etcd runs."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc.aio

from basalt.machinery.resources import EtcdMemberSpec, EtcdStatusSpec

from .client import member_id_text

if TYPE_CHECKING:
    from ..node import Node
    from .manager import EtcdManager

log = logging.getLogger(__name__)
OWNER = "etcd"
INTERVAL = 5.0


async def refresh(node: Node, manager: EtcdManager) -> None:
    async with manager.client(timeout=2.0) as client:
        status = await client.status()
        node.store.put(
            "EtcdStatuses",
            "local",
            EtcdStatusSpec(
                member_id=member_id_text(status.header.member_id),
                leader=member_id_text(status.leader),
                raft_index=status.raftIndex,
                raft_term=status.raftTerm,
                db_size=status.dbSize,
                version=status.version,
                is_learner=status.isLearner,
                errors=list(status.errors),
            ),
            owner=OWNER,
        )
        if status.isLearner:
            return  # learners cannot list members
        members = await client.members()
    for member in members:
        node.store.put(
            "EtcdMembers",
            member_id_text(member.ID),
            EtcdMemberSpec(
                name=member.name,
                peer_urls=list(member.peerURLs),
                client_urls=list(member.clientURLs),
                is_learner=member.isLearner,
            ),
            owner=OWNER,
        )
    node.store.retain("EtcdMembers", {member_id_text(m.ID) for m in members}, owner=OWNER)


async def observe_forever(node: Node, manager: EtcdManager) -> None:
    """Refresh every INTERVAL while etcd runs; every second until the first refresh works."""
    fresh = False
    while True:
        if manager.running():
            try:
                await refresh(node, manager)
                fresh = True
            except grpc.aio.AioRpcError as exc:
                log.debug("etcd status not available: %s", exc.details())
                fresh = False
        else:
            node.store.retain("EtcdMembers", set(), owner=OWNER)
            node.store.retain("EtcdStatuses", set(), owner=OWNER)
            fresh = False
        await asyncio.sleep(INTERVAL if fresh else 1.0)
