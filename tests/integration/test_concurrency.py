"""Many clients at once, big answers in bounded chunks, followers that never finish."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest

from basalt.machinery.api import common_pb2, machine_pb2
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    live = start_cluster(tmp_path_factory.mktemp("many"), "many", "127.0.0.161", workers=1)
    yield live
    stop_cluster(live)


def test_many_concurrent_clients_all_get_answers(cluster: LiveCluster) -> None:
    targets = [cluster.controlplanes[0], cluster.workers[0]]

    async def one(index: int) -> int:
        client = await cluster.client(nodes=[targets[index % 2]])
        try:
            answered = 0
            for _ in range(5):
                answer = await client.machine.Version(
                    common_pb2.Empty(), metadata=client.metadata(), timeout=30
                )
                answered += len(answer.messages)
            return answered
        finally:
            await client.close()

    async def all_of_them() -> list[int]:
        return list(await asyncio.gather(*(one(i) for i in range(64))))

    assert run(all_of_them()) == [5] * 64


def test_followers_do_not_block_other_requests(cluster: LiveCluster) -> None:
    async def scenario() -> int:
        client = await cluster.client(nodes=cluster.workers)
        followers = [
            client.machine.Logs(
                machine_pb2.LogsRequest(id="machined", follow=True, tail_lines=1),
                metadata=client.metadata(),
            )
            for _ in range(16)
        ]
        try:
            for stream in followers:  # each delivers its tail, then waits for more
                await asyncio.wait_for(stream.read(), timeout=10)
            answer = await client.machine.ServiceList(
                common_pb2.Empty(), metadata=client.metadata(), timeout=10
            )
            return len(answer.messages[0].services)
        finally:
            for stream in followers:
                stream.cancel()
            await client.close()

    assert run(scenario()) >= 2


def test_large_file_arrives_in_bounded_chunks(cluster: LiveCluster) -> None:
    worker = cluster.workers[0]
    payload = bytes(range(256)) * (6 * 1024 * 1024 // 256)  # 6 MiB
    target = cluster.node_dir(worker) / "var" / "big.bin"
    target.write_bytes(payload)

    async def read() -> tuple[bytes, int]:
        client = await cluster.client(nodes=[worker])
        try:
            chunks = [
                c
                async for c in client.machine.Read(
                    machine_pb2.ReadRequest(path="/var/big.bin"),
                    metadata=client.metadata(),
                    timeout=60,
                )
            ]
        finally:
            await client.close()
        return b"".join(c.bytes for c in chunks), max(len(c.bytes) for c in chunks)

    data, largest = run(read())
    assert data == payload
    assert largest <= 64 * 1024


def test_oversized_request_is_refused_cleanly(cluster: LiveCluster) -> None:
    async def send() -> grpc.StatusCode:
        client = await cluster.client()
        try:
            await client.machine.ApplyConfiguration(
                machine_pb2.ApplyConfigurationRequest(data=b"x" * (2 * 1024 * 1024)), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        finally:
            await client.close()
        return grpc.StatusCode.OK

    assert run(send()) == grpc.StatusCode.RESOURCE_EXHAUSTED  # over the method's 2 MiB
