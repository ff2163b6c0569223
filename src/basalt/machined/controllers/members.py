"""Members: every node announces itself to the control plane endpoint's trust service
and learns the cluster's member list from the answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from basalt.machinery.api import TRUST_PORT, trust_pb2, trust_pb2_grpc
from basalt.machinery.client.client import CHANNEL_OPTIONS
from basalt.machinery.resources import MemberSpec

from ..runtime import Controller, ResourceStore

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)


class MembersController(Controller):
    name = "members"
    inputs = ("MachineConfigs",)
    outputs = ("Members",)

    def __init__(self, node: Node) -> None:
        self.node = node
        self._loop: asyncio.Task[None] | None = None

    async def reconcile(self, store: ResourceStore) -> None:
        if self.node.config is None or self._loop is not None:
            return
        self._loop = self.node.background(self._announce_forever(store), name="announce")

    async def _announce_forever(self, store: ResourceStore) -> None:
        while True:
            if self.node.identity is None:  # not yet: announce as soon as it exists
                await asyncio.sleep(0.2)
                continue
            try:
                await self.announce(store)
            except grpc.aio.AioRpcError as exc:
                log.debug("announce failed: %s", exc.details())
                await asyncio.sleep(min(1.0, self.node.tuning.announce_interval))
                continue
            await asyncio.sleep(self.node.tuning.announce_interval)

    def _member(self) -> trust_pb2.Member:
        machine = self.node.machine
        return trust_pb2.Member(
            id=self.node.hostname,
            hostname=self.node.hostname,
            machine_type=machine.type if machine else "",
            addresses=[self.node.address],
            version=self.node.version,
        )

    async def announce(self, store: ResourceStore) -> None:
        from ..certificates import trust_endpoint

        machine = self.node.machine
        identity = self.node.identity
        if machine is None or identity is None:
            return
        host = trust_endpoint(self.node)
        target = f"[{host}]:{TRUST_PORT}" if ":" in host else f"{host}:{TRUST_PORT}"
        credentials = grpc.ssl_channel_credentials(root_certificates=identity.ca.encode())
        async with grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS) as channel:
            answer = await trust_pb2_grpc.TrustServiceStub(channel).Announce(
                trust_pb2.AnnounceRequest(
                    token=machine.token,
                    member=self._member(),
                    certificate=identity.server.crt.encode(),
                ),
                timeout=5,
            )
        publish_members(self.node, answer.members)


def publish_members(node: Node, members: Iterable[trust_pb2.Member]) -> None:
    """Make ``members`` the node's Members resources (and its name -> address map)."""
    seen = set()
    for member in members:
        seen.add(member.id)
        node.members[member.id] = member
        node.store.put(
            "Members",
            member.id,
            MemberSpec(
                hostname=member.hostname,
                machine_type=member.machine_type,
                addresses=list(member.addresses),
                version=member.version,
                last_seen=member.last_seen,
            ),
            owner=MembersController.name,
        )
    for gone in [k for k in node.members if k not in seen]:
        del node.members[gone]
    node.store.retain("Members", seen, owner=MembersController.name)
