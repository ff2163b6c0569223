"""The etcd RPCs of MachineService (a mixin of MachineServicer)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from basalt.machinery.api import common_pb2, machine_pb2

from .auth import current_principal
from .errors import InvalidRequestError, UnavailableError

if TYPE_CHECKING:
    from ..etcd.manager import EtcdManager
    from ..node import Node

Context = grpc.aio.ServicerContext[Any, Any]
MAX_SNAPSHOT = 8 * 1024 * 1024 * 1024


class EtcdMethods:
    node: Node

    def meta(self) -> common_pb2.Metadata:
        raise NotImplementedError

    def action(self, message: str) -> common_pb2.ActionResponse:
        raise NotImplementedError

    def _etcd(self) -> EtcdManager:
        from ..etcd.manager import manager_of

        manager = manager_of(self.node)
        if not self.node.is_controlplane or manager is None:
            raise InvalidRequestError(
                "etcd runs on control planes only",
                hint="target a control plane with -n",
            )
        return manager

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(f"etcd: {exc.code().name}: {exc.details()}") from None

    async def Bootstrap(self, request: machine_pb2.BootstrapRequest, context: Context) -> Any:
        return self.action(await self._etcd().bootstrap(request.recover_etcd))

    async def EtcdRecover(self, requests: AsyncIterator[common_pb2.Data], context: Context) -> Any:
        manager = self._etcd()
        chunks: list[bytes] = []
        total = 0
        async for chunk in requests:
            total += len(chunk.bytes)
            if total > MAX_SNAPSHOT:
                raise InvalidRequestError("the snapshot is larger than 8 GiB")
            chunks.append(chunk.bytes)
        size = await manager.save_recover_snapshot(chunks)
        return self.action(f"snapshot of {size} bytes stored for recovery")

    async def EtcdMemberList(self, request: common_pb2.Empty, context: Context) -> Any:
        from ..etcd.client import member_id_text

        manager = self._etcd()
        manager.require_running()
        async with manager.client() as client:
            members = await self._call(client.members())
        found = [
            machine_pb2.EtcdMember(
                id=m.ID,
                hostname=m.name,
                peer_urls=list(m.peerURLs),
                client_urls=list(m.clientURLs),
                is_learner=m.isLearner,
            )
            for m in sorted(members, key=lambda m: (m.name, member_id_text(m.ID)))
        ]
        return machine_pb2.EtcdMemberListResponse(
            messages=[machine_pb2.EtcdMembers(metadata=self.meta(), members=found)]
        )

    async def EtcdStatus(self, request: common_pb2.Empty, context: Context) -> Any:
        manager = self._etcd()
        manager.require_running()
        async with manager.client() as client:
            status = await self._call(client.status())
        answer = machine_pb2.EtcdMemberStatus(
            metadata=self.meta(),
            member_id=status.header.member_id,
            version=status.version,
            db_size=status.dbSize,
            db_size_in_use=status.dbSizeInUse,
            leader=status.leader,
            raft_index=status.raftIndex,
            raft_term=status.raftTerm,
            raft_applied_index=status.raftAppliedIndex,
            errors=list(status.errors),
            is_learner=status.isLearner,
        )
        return machine_pb2.EtcdStatusResponse(messages=[answer])

    async def EtcdLeaveCluster(
        self, request: machine_pb2.EtcdLeaveClusterRequest, context: Context
    ) -> Any:
        manager = self._etcd()
        return self.action(
            await self._call(manager.leave(request.force, request.destroy_last_member))
        )

    async def EtcdRemoveMember(
        self, request: machine_pb2.EtcdRemoveMemberRequest, context: Context
    ) -> Any:
        if not request.member:
            raise InvalidRequestError("name the member to remove (id or host name)")
        return self.action(await self._call(self._etcd().remove_member(request.member)))

    async def EtcdForfeitLeadership(self, request: common_pb2.Empty, context: Context) -> Any:
        return self.action(await self._call(self._etcd().forfeit_leadership()))

    async def EtcdSnapshot(self, request: common_pb2.Empty, context: Context) -> AsyncIterator[Any]:
        manager = self._etcd()
        manager.require_running()
        meta = self.meta()
        principal = current_principal.get()
        self.node.events.publish(
            "secrets",
            "etcd snapshot taken (it holds every Kubernetes Secret)",
            actor="apid",
            subject=principal.subject or "(unknown)",
        )
        async with manager.client() as client:
            try:
                async for blob in client.snapshot():
                    yield common_pb2.Data(metadata=meta, bytes=blob)
            except grpc.aio.AioRpcError as exc:
                raise UnavailableError(f"etcd: {exc.code().name}: {exc.details()}") from None

    async def EtcdDefragment(self, request: common_pb2.Empty, context: Context) -> Any:
        manager = self._etcd()
        manager.require_running()
        async with manager.client() as client:
            await self._call(client.defragment())
        return self.action(f"defragmented the etcd database on {manager.name}")

    async def EtcdAlarmList(self, request: common_pb2.Empty, context: Context) -> Any:
        from basalt.machinery.api import etcd_pb2

        manager = self._etcd()
        manager.require_running()
        async with manager.client() as client:
            alarms = await self._call(client.alarms())
        listed = [
            machine_pb2.EtcdAlarm(member_id=a.memberID, alarm=etcd_pb2.AlarmType.Name(a.alarm))
            for a in alarms
        ]
        return machine_pb2.EtcdAlarmListResponse(
            messages=[machine_pb2.EtcdAlarms(metadata=self.meta(), alarms=listed)]
        )

    async def EtcdAlarmDisarm(self, request: common_pb2.Empty, context: Context) -> Any:
        manager = self._etcd()
        manager.require_running()
        async with manager.client() as client:
            alarms = await self._call(client.alarms())
            for alarm in alarms:
                await self._call(client.disarm(alarm))
        return self.action(f"disarmed {len(alarms)} alarm(s)")
