"""Members: every node announces itself to the control plane endpoint's trust service
and learns the cluster's member list from the answer.

With discovery (``DiscoveryConfig``), ``Members`` is the union of that list and the
discovery service's ``Affiliates``: a member the trust service lists is shown as it
lists it; an affiliate it does not list (by host name) is added, with ``lastSeen`` the
time its record last changed. So ``get members`` works when the control plane endpoint
cannot be reached. ``node.members`` — what API forwarding (``-n``) may dial — stays the
trust service's list only: a trust member's certificate was checked against its
announcement, while an affiliate shows only that its writer holds the cluster secret
(which workers hold too).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from basalt.machinery.api import TRUST_PORT, trust_pb2, trust_pb2_grpc
from basalt.machinery.client.client import CHANNEL_OPTIONS
from basalt.machinery.resources import AffiliateSpec, MemberSpec

from ..runtime import Controller, ResourceStore
from ..runtime.store import Resource

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)


class MembersController(Controller):
    name = "members"
    inputs = ("MachineConfigs", "Affiliates")
    outputs = ("Members",)

    def __init__(self, node: Node) -> None:
        self.node = node
        self._loop: asyncio.Task[None] | None = None

    async def reconcile(self, store: ResourceStore) -> None:
        if self.node.config is None:
            return
        if self._loop is None:
            self._loop = self.node.background(self._announce_forever(store), name="announce")
        write_members(self.node)

    async def _announce_forever(self, store: ResourceStore) -> None:
        loop = asyncio.get_running_loop()
        started: float | None = None
        while True:
            if self.node.identity is None:  # not yet: announce as soon as it exists
                await asyncio.sleep(0.2)
                continue
            started = loop.time() if started is None else started
            try:
                await self.announce(store)
            except grpc.aio.AioRpcError as exc:
                log.debug("announce failed: %s", exc.details())
                await asyncio.sleep(min(1.0, self.node.tuning.announce_interval))
                continue
            await asyncio.sleep(
                announce_delay(
                    self.node.members.values(),
                    self.node.hostname,
                    self.node.tuning.announce_interval,
                    loop.time() - started,
                )
            )

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
        from ..certificates import trust_bundle, trust_endpoint

        machine = self.node.machine
        identity = self.node.identity
        if machine is None or identity is None:
            return
        host = trust_endpoint(self.node)
        target = f"[{host}]:{TRUST_PORT}" if ":" in host else f"{host}:{TRUST_PORT}"
        credentials = grpc.ssl_channel_credentials(
            root_certificates=trust_bundle(self.node).encode()
        )
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


#: While a cluster forms, how long a node asks again every second when the trust
#: service's answer lists no other control plane (see announce_delay).
FORMING = 60.0


def announce_delay(
    members: Iterable[trust_pb2.Member], own_hostname: str, interval: float, elapsed: float
) -> float:
    """Seconds until the next announcement. The answer is all a node knows of the other
    control planes (etcd joins through them): when the control planes start together, the
    first answers may list none yet, and waiting a whole interval for the next one would
    hold their etcd joins back by that much. So for the first FORMING seconds, a list with
    no other control plane is asked again after a second."""
    others = any(m.machine_type == "controlplane" and m.hostname != own_hostname for m in members)
    if others or elapsed >= FORMING:
        return interval
    return min(1.0, interval)


def publish_members(node: Node, members: Iterable[trust_pb2.Member]) -> None:
    """Make ``members`` the node's member list (its name -> address map) and write the
    Members resources (with discovery's affiliates)."""
    listed = {member.id: member for member in members}
    node.members.clear()
    node.members.update(listed)
    write_members(node)


def write_members(node: Node) -> None:
    """Members resources: the trust service's list, plus affiliates it does not list."""
    specs = member_specs(node.members.values(), node.store.list("Affiliates"))
    for member_id, spec in specs.items():
        node.store.put("Members", member_id, spec, owner=MembersController.name)
    node.store.retain("Members", set(specs), owner=MembersController.name)


def member_specs(
    trusted: Iterable[trust_pb2.Member], affiliates: Iterable[Resource]
) -> dict[str, MemberSpec]:
    """Members by id: every trusted member, then each affiliate whose host name no trusted
    member has (id: its host name, else its affiliate id)."""
    found = {
        m.id: MemberSpec(
            hostname=m.hostname,
            machine_type=m.machine_type,
            addresses=list(m.addresses),
            version=m.version,
            last_seen=m.last_seen,
        )
        for m in trusted
    }
    hostnames = {spec.hostname for spec in found.values()}
    for resource in affiliates:
        spec = resource.spec
        if not isinstance(spec, AffiliateSpec) or spec.hostname in hostnames:
            continue
        member_id = spec.hostname or resource.meta.id
        if member_id in found:
            continue
        hostnames.add(spec.hostname)
        found[member_id] = MemberSpec(
            hostname=spec.hostname,
            machine_type=spec.machine_type,
            addresses=list(spec.addresses),
            version=spec.version,
            last_seen=resource.meta.updated,
        )
    return found
