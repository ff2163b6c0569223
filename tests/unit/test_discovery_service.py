"""The discovery service: its registry (state, TTL on a hand-driven clock, limits, watches),
snapshots, and the servicer over an in-process gRPC server on loopback."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from basalt.discovery import snapshot
from basalt.discovery.limits import LimitReached, Limits, TokenBucket, TooLarge
from basalt.discovery.server import DiscoveryServer, ServerOptions
from basalt.discovery.service import peer_address
from basalt.discovery.state import Registry, Watch
from basalt.machinery.api import discovery_pb2, discovery_pb2_grpc
from basalt.machinery.discovery import (
    Affiliate,
    ClusterKeys,
    DiscoveryAuthError,
    DiscoveryClient,
    DiscoveryLimitError,
    DiscoveryRequestError,
)
from basalt.machinery.discovery.crypto import NonceCache
from basalt.machinery.discovery.errors import DiscoveryError

C1, C2 = "a" * 64, "b" * 64
T0 = 1_700_000_000.0


def registry(**limits: int) -> Registry:
    return Registry(Limits(**limits))


# -- the registry --------------------------------------------------------------------------------


def test_update_replaces_and_dedups_endpoints() -> None:
    reg = registry()
    reg.update(C1, "n1", b"d1", [b"e2", b"e1", b"e2"], 60, T0)
    record = reg.update(C1, "n1", b"d2", [b"e1"], 60, T0 + 1)
    assert reg.affiliates(C1) == {"n1": record}
    assert record.endpoints == (b"e1",) and record.data == b"d2"
    first = reg.update(C1, "n2", b"d", [b"e2", b"e1", b"e2"], 0, T0)
    assert first.endpoints == (b"e1", b"e2")
    assert first.expires == T0 + 1800  # the default TTL
    assert reg.affiliates(C2) == {}
    assert reg.affiliate_count == 2


def test_ttl_expiry_on_a_fake_clock() -> None:
    reg = registry()
    reg.update(C1, "n1", b"d", [], 60, T0)
    reg.update(C1, "n2", b"d", [], 120, T0)
    assert reg.expire(T0 + 59) == []
    # A refresh pushes the expiry; the old heap entry must not remove the record.
    reg.update(C1, "n1", b"d", [], 60, T0 + 50)
    assert reg.expire(T0 + 60) == []
    assert reg.expire(T0 + 110) == [(C1, "n1")]
    assert reg.expire(T0 + 120) == [(C1, "n2")]
    assert reg.clusters == {}  # an empty cluster with no watch is forgotten


def test_delete() -> None:
    reg = registry()
    reg.update(C1, "n1", b"d", [], 60, T0)
    assert reg.delete(C1, "n1", T0)
    assert not reg.delete(C1, "n1", T0)
    assert not reg.delete(C2, "n1", T0)
    assert reg.expire(T0 + 100) == []


@pytest.mark.parametrize(
    ("limits", "call", "limit"),
    [
        ({"data_size": 4}, lambda r: r.update(C1, "n", b"12345", [], 60, T0), "data_size"),
        ({"endpoint_size": 2}, lambda r: r.update(C1, "n", b"", [b"123"], 60, T0), "endpoint_size"),
        (
            {"endpoints_per_affiliate": 2},
            lambda r: r.update(C1, "n", b"", [b"1", b"2", b"3"], 60, T0),
            "endpoints_per_affiliate",
        ),
        ({"ttl_max": 10}, lambda r: r.update(C1, "n", b"", [], 11, T0), "ttl_max"),
    ],
)
def test_size_limits(
    limits: dict[str, int], call: Callable[[Registry], object], limit: str
) -> None:
    reg = registry(**limits)
    with pytest.raises(TooLarge, match=f"limit {limit}=") as caught:
        call(reg)
    assert caught.value.limit == limit
    assert reg.clusters == {}


def test_count_limits() -> None:
    reg = registry(affiliates_per_cluster=2, clusters=2, watches_per_cluster=1)
    reg.update(C1, "n1", b"", [], 60, T0)
    reg.update(C1, "n2", b"", [], 60, T0)
    reg.update(C1, "n2", b"", [], 60, T0)  # replacing is not adding
    with pytest.raises(LimitReached, match="affiliates_per_cluster=2 reached"):
        reg.update(C1, "n3", b"", [], 60, T0)
    reg.update(C2, "n1", b"", [], 60, T0)
    with pytest.raises(LimitReached, match="clusters=2"):
        reg.update("c" * 64, "n1", b"", [], 60, T0)
    reg.watch(C1)
    with pytest.raises(LimitReached, match="watches_per_cluster=1"):
        reg.watch(C1)


def _drain(watch: Watch) -> list[tuple[str, str]]:
    changes: list[tuple[str, str]] = []
    while not watch.queue.empty():
        change = watch.queue.get_nowait()
        assert change is not None
        changes.append((change.kind, change.affiliate_id))
    return changes


def test_total_size() -> None:
    reg = registry(total_size=10)
    reg.update(C1, "n1", b"12345", [b"ab"], 60, T0)
    reg.update(C1, "n1", b"1234567", [b"ab"], 60, T0)  # replacing counts the difference
    assert reg.size == 9
    with pytest.raises(LimitReached, match="total_size=10"):
        reg.update(C2, "n1", b"12", [], 60, T0)
    assert C2 not in reg.clusters
    reg.delete(C1, "n1", T0)
    reg.update(C2, "n1", b"12", [], 60, T0)
    reg.expire(T0 + 61)
    assert reg.size == 0


def test_watch_fan_out_and_slow_watch_dropped() -> None:
    reg = registry(watch_queue=3)
    reg.update(C1, "n1", b"d", [], 60, T0)
    fast, snap = reg.watch(C1)
    slow, _ = reg.watch(C1)
    other, _ = reg.watch(C2)
    assert list(snap) == ["n1"]
    for name in ("m0", "m1", "m2"):
        reg.update(C1, name, b"d", [], 60, T0)
    assert _drain(fast) == [("update", "m0"), ("update", "m1"), ("update", "m2")]
    assert not slow.dropped
    reg.delete(C1, "m0", T0)
    # slow had 3 waiting when the 4th came: dropped, emptied, and woken with None.
    assert slow.dropped and "watch_queue=3" in slow.dropped
    assert slow.queue.get_nowait() is None and slow.queue.empty()
    assert reg.dropped_watches == 1 and reg.watch_count == 2
    assert other.queue.empty()  # another cluster's watch sees nothing
    reg.delete(C1, "m1", T0)
    assert _drain(fast) == [("delete", "m0"), ("delete", "m1")]
    reg.expire(T0 + 61)
    assert _drain(fast) == [("expired", "m2"), ("expired", "n1")]
    reg.unwatch(fast)
    reg.unwatch(other)
    assert reg.watch_count == 0 and reg.clusters == {}


def test_limits_from_options() -> None:
    limits = Limits().replace(["affiliates_per_cluster=5", "client-rate=2.5"])
    assert limits.affiliates_per_cluster == 5 and limits.client_rate == 2.5
    for bad in ("nope=1", "data_size", "data_size=x", "data_size=0"):
        with pytest.raises(DiscoveryRequestError):
            Limits().replace([bad])


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)
    assert bucket.full(10)


def test_peer_address() -> None:
    assert peer_address("ipv4:127.0.0.2:5000") == "127.0.0.2"
    assert peer_address("ipv6:%5B::1%5D:5000") == "::1"
    assert peer_address("unix:/run/x") == "unix:/run/x"


# -- snapshots ---------------------------------------------------------------------------------


def test_snapshot_round_trip(tmp_path: Path) -> None:
    reg, nonces = registry(), NonceCache()
    reg.update(C1, "n1", b"\x00data", [b"e1", b"e2"], 60, T0)
    reg.update(C1, "n2", b"short", [], 10, T0)
    reg.update(C2, "n1", b"x", [], 100, T0)
    keys = ClusterKeys.from_secret(os.urandom(32), os.urandom(32))
    proof = keys.proof("List", now=T0)
    nonces.check(keys.wire_id, proof, T0)
    path = tmp_path / snapshot.NAME
    snapshot.save(path, snapshot.encode(snapshot.capture(reg, nonces, T0)))
    assert path.stat().st_mode & 0o777 == 0o600

    again, again_nonces = registry(), NonceCache()
    assert snapshot.load(path, again, again_nonces, T0 + 20) == (2, 1)
    assert again.affiliates(C1) == {"n1": reg.affiliates(C1)["n1"]}
    assert again.affiliates(C2) == reg.affiliates(C2)
    with pytest.raises(DiscoveryAuthError, match="replayed"):
        again_nonces.check(keys.wire_id, proof, T0 + 20)
    # Restored records still expire.
    assert again.expire(T0 + 61) == [(C1, "n1")]


def test_snapshot_missing_and_bad(tmp_path: Path) -> None:
    assert snapshot.load(tmp_path / "none.json", registry(), NonceCache(), T0) == (0, 0)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 1, "records": [[1]]}')
    with pytest.raises(snapshot.SnapshotError, match="not a discovery snapshot"):
        snapshot.load(bad, registry(), NonceCache(), T0)
    bad.write_text('{"format": 9}')
    with pytest.raises(snapshot.SnapshotError, match="format 9"):
        snapshot.load(bad, registry(), NonceCache(), T0)


# -- the servicer on loopback ------------------------------------------------------------------


def run(
    test: Callable[[DiscoveryServer], Awaitable[None]],
    tmp_path: Path | None = None,
    **limits: float,
) -> None:
    async def main() -> None:
        options = ServerOptions(port=0, limits=Limits(**limits), state_dir=tmp_path)  # type: ignore[arg-type]
        server = DiscoveryServer(options)
        await server.start()
        try:
            await test(server)
        finally:
            await server.stop(0)

    asyncio.run(main())


def keys() -> ClusterKeys:
    return ClusterKeys.from_secret(os.urandom(32), os.urandom(32))


NODE = Affiliate("id-1", "node-1", "worker", ("10.0.0.1", "fd00::1"), "0.1.0")


def test_publish_list_watch_delete() -> None:
    async def test(server: DiscoveryServer) -> None:
        cluster = keys()
        async with DiscoveryClient(f"grpc://127.0.0.1:{server.port}", cluster) as client:
            await client.update("n1", NODE, ttl=60)
            assert await client.list() == [("n1", NODE)]
            events = client.watch()
            first = await anext(events)
            assert first.kind == "snapshot" and first.affiliates == {"n1": NODE}
            await client.update("n2", NODE)
            second = await anext(events)
            assert (second.kind, second.affiliate_id) == ("update", "n2")
            assert set(second.affiliates) == {"n1", "n2"}
            await client.delete("n1")
            third = await anext(events)
            assert (third.kind, third.affiliates) == ("delete", {"n2": NODE})
            await events.aclose()
        text = server.render_metrics()
        assert 'basalt_discovery_requests_total{method="AffiliateUpdate",code="OK"} 2' in text
        assert "basalt_discovery_fanout_seconds_count 2" in text

    run(test)


def test_expiry_reaches_watchers() -> None:
    async def test(server: DiscoveryServer) -> None:
        async with DiscoveryClient(f"grpc://127.0.0.1:{server.port}", keys()) as client:
            await client.update("n1", NODE, ttl=1)
            events = client.watch()
            assert (await anext(events)).affiliates == {"n1": NODE}
            event = await asyncio.wait_for(anext(events), 5)
            assert (event.kind, event.expired, event.affiliates) == ("delete", True, {})
            await events.aclose()

    run(test)


async def _raw_list(port: int, request: discovery_pb2.ListRequest) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = discovery_pb2_grpc.DiscoveryStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.List(request)
        return caught.value


def test_proofs_refused_alike() -> None:
    async def test(server: DiscoveryServer) -> None:
        cluster, stranger = keys(), keys()
        async with DiscoveryClient(f"grpc://127.0.0.1:{server.port}", cluster) as client:
            await client.update("n1", NODE)
        # No proof, another cluster's proof: the same status, the same words, whether or not
        # the cluster has records.
        details = set()
        for cluster_id in (cluster.wire_id, "c" * 64):
            for proof in (None, stranger.proof("List")):
                request = discovery_pb2.ListRequest(cluster_id=cluster_id)
                if proof is not None:
                    request.proof.CopyFrom(
                        discovery_pb2.Proof(
                            public_key=proof.public_key,
                            timestamp=proof.timestamp,
                            nonce=proof.nonce,
                            signature=proof.signature,
                        )
                    )
                error = await _raw_list(server.port, request)
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
                details.add(error.details())
        assert len(details) == 2  # "no proof" and "refused", never "no such cluster"
        assert not any(cluster.wire_id in (d or "") for d in details)
        bad = await _raw_list(server.port, discovery_pb2.ListRequest(cluster_id="nope"))
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        text = server.render_metrics()
        assert 'reason="proof_key"' in text and 'reason="proof_missing"' in text

    run(test)


def test_rate_limit_and_watches_per_client() -> None:
    async def test(server: DiscoveryServer) -> None:
        async with DiscoveryClient(f"grpc://127.0.0.1:{server.port}", keys()) as client:
            await client.list()
            await client.list()
            with pytest.raises(DiscoveryLimitError, match="client_rate=1"):
                await client.list()
            server.service._buckets.clear()
            events = client.watch()
            await anext(events)
            second = client.watch()
            with pytest.raises(DiscoveryLimitError, match="watches_per_client=1"):
                await anext(second)
            await events.aclose()

    run(test, client_rate=1, client_burst=2, watches_per_client=1)


def test_slow_watch_dropped_with_clear_status() -> None:
    async def test(server: DiscoveryServer) -> None:
        cluster = keys()
        async with DiscoveryClient(f"grpc://127.0.0.1:{server.port}", cluster) as client:
            events = client.watch()
            await anext(events)
            # Changes queue faster than this watch reads them (it reads none meanwhile).
            for i in range(3):
                server.registry.update(cluster.wire_id, f"n{i}", b"x" * 40, [], 60, 1e10)
            with pytest.raises(DiscoveryLimitError, match="watch_queue=2"):
                async for _ in events:
                    pass
            assert server.registry.watch_count == 0

    run(test, watch_queue=2)


def test_stop_writes_a_snapshot_and_start_reads_it(tmp_path: Path) -> None:
    cluster = keys()

    async def first(server: DiscoveryServer) -> None:
        async with DiscoveryClient(f"grpc://127.0.0.1:{server.port}", cluster) as client:
            await client.update("n1", NODE)

    async def second(server: DiscoveryServer) -> None:
        async with DiscoveryClient(f"grpc://127.0.0.1:{server.port}", cluster) as client:
            assert await client.list() == [("n1", NODE)]

    run(first, tmp_path)
    assert (tmp_path / snapshot.NAME).exists()
    run(second, tmp_path)


def test_watch_ends_when_the_server_stops() -> None:
    async def main() -> None:
        server = DiscoveryServer(ServerOptions(port=0))
        await server.start()
        client = DiscoveryClient(f"grpc://127.0.0.1:{server.port}", keys())
        events = client.watch()
        await anext(events)
        await server.stop(0)
        with pytest.raises(DiscoveryError):
            await asyncio.wait_for(anext(events), 10)
        await client.close()

    asyncio.run(main())


def test_status_codes_pinned() -> None:
    from basalt.discovery.service import status_of
    from basalt.machinery.discovery.crypto import ProofRefused
    from basalt.machinery.discovery.errors import DiscoveryDataError

    code = grpc.StatusCode
    expected = {
        LimitReached("clusters", 1, "x"): code.RESOURCE_EXHAUSTED,
        TooLarge("data_size", 1, "x"): code.INVALID_ARGUMENT,
        ProofRefused("signature", "x"): code.PERMISSION_DENIED,
        DiscoveryAuthError("x"): code.PERMISSION_DENIED,
        DiscoveryRequestError("x"): code.INVALID_ARGUMENT,
        DiscoveryLimitError("x"): code.RESOURCE_EXHAUSTED,
        DiscoveryDataError("x"): code.INVALID_ARGUMENT,
        DiscoveryError("x"): code.UNAVAILABLE,
    }
    for error, status in expected.items():
        assert status_of(error) == status, type(error).__name__
