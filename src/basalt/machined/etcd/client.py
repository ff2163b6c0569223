"""A small async etcd client over our etcd.proto stubs (see docs/adr/0005-etcd-client.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from basalt.machinery.api import etcd_pb2, etcd_pb2_grpc
from basalt.machinery.pki import CertificateAndKey

CLIENT_PORT = 2379
PEER_PORT = 2380


def client_url(address: str) -> str:
    return f"https://{address}:{CLIENT_PORT}"


def peer_url(address: str) -> str:
    return f"https://{address}:{PEER_PORT}"


def _target(url: str) -> str:
    return url.removeprefix("https://").removeprefix("http://").rstrip("/")


class EtcdClient:
    """One member's client endpoint. ``timeout`` bounds every call."""

    def __init__(
        self, url: str, ca: str, client: CertificateAndKey, *, timeout: float = 5.0
    ) -> None:
        assert client.key is not None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.encode(),
            private_key=client.key.encode(),
            certificate_chain=client.crt.encode(),
        )
        self.url = url
        self.timeout = timeout
        self.channel = grpc.aio.secure_channel(_target(url), credentials)
        self.kv = etcd_pb2_grpc.KVStub(self.channel)
        self.cluster = etcd_pb2_grpc.ClusterStub(self.channel)
        self.maintenance = etcd_pb2_grpc.MaintenanceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def members(self) -> list[etcd_pb2.Member]:
        answer = await self.cluster.MemberList(etcd_pb2.MemberListRequest(), timeout=self.timeout)
        return list(answer.members)

    async def add_learner(self, peer_urls: Sequence[str]) -> etcd_pb2.MemberAddResponse:
        request = etcd_pb2.MemberAddRequest(peerURLs=list(peer_urls), isLearner=True)
        answer: etcd_pb2.MemberAddResponse = await self.cluster.MemberAdd(
            request, timeout=self.timeout
        )
        return answer

    async def promote(self, member_id: int) -> None:
        await self.cluster.MemberPromote(
            etcd_pb2.MemberPromoteRequest(ID=member_id), timeout=self.timeout
        )

    async def remove(self, member_id: int) -> None:
        await self.cluster.MemberRemove(
            etcd_pb2.MemberRemoveRequest(ID=member_id), timeout=self.timeout
        )

    async def status(self) -> etcd_pb2.StatusResponse:
        answer: etcd_pb2.StatusResponse = await self.maintenance.Status(
            etcd_pb2.StatusRequest(), timeout=self.timeout
        )
        return answer

    async def defragment(self) -> None:
        await self.maintenance.Defragment(etcd_pb2.DefragmentRequest(), timeout=60)

    async def alarms(self) -> list[etcd_pb2.AlarmMember]:
        answer = await self.maintenance.Alarm(
            etcd_pb2.AlarmRequest(action=etcd_pb2.AlarmRequest.GET), timeout=self.timeout
        )
        return list(answer.alarms)

    async def disarm(self, alarm: etcd_pb2.AlarmMember) -> None:
        await self.maintenance.Alarm(
            etcd_pb2.AlarmRequest(
                action=etcd_pb2.AlarmRequest.DEACTIVATE, memberID=alarm.memberID, alarm=alarm.alarm
            ),
            timeout=self.timeout,
        )

    async def move_leader(self, target: int) -> None:
        await self.maintenance.MoveLeader(etcd_pb2.MoveLeaderRequest(targetID=target), timeout=30)

    async def snapshot(self) -> AsyncIterator[bytes]:
        call: Any = self.maintenance.Snapshot(etcd_pb2.SnapshotRequest(), timeout=600)
        async for chunk in call:
            yield chunk.blob

    async def put(self, key: bytes, value: bytes) -> int:
        answer = await self.kv.Put(etcd_pb2.PutRequest(key=key, value=value), timeout=self.timeout)
        return int(answer.header.revision)

    async def get(self, key: bytes) -> bytes | None:
        answer = await self.kv.Range(etcd_pb2.RangeRequest(key=key), timeout=self.timeout)
        return bytes(answer.kvs[0].value) if answer.kvs else None


def member_id_text(member_id: int) -> str:
    return f"{member_id:016x}"


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
