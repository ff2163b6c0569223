"""The discovery service on the wire: a real ``basalt-discovery serve`` process on
127.0.0.163, nodes as DiscoveryClients, strangers as raw gRPC callers.

A stranger knows the cluster's wire id (it sees it in every request) but not the secret:
it cannot list, watch, update or delete the cluster's records, nor replay a captured
request (the same nonce, after the window, after a restart). Records changed in the
store are refused by the client. Oversize and flooding requests are refused with errors
that name the limit, while another client's requests keep succeeding. A restart loses
no record. The fleet serves the same service with its certificate (grpcs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest

from basalt.machinery.api import discovery_pb2, discovery_pb2_grpc
from basalt.machinery.discovery import (
    Affiliate,
    ClusterKeys,
    DiscoveryClient,
    DiscoveryError,
    DiscoveryLimitError,
    DiscoveryRequestError,
)
from basalt.machinery.discovery.crypto import Proof, update_digest

pytestmark = pytest.mark.integration

HOST = "127.0.0.163"
#: A second client address: a TCP relay bound to it, so the service sees another peer.
FLOOD_HOST = "127.0.0.164"
FLEET_HOST = "127.0.0.165"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    state: Path
    log: Path
    port: int
    metrics_port: int
    limits: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"grpc://{HOST}:{self.port}"

    def start(self) -> None:
        args = [
            sys.executable, "-m", "basalt.discovery", "serve",
            "--listen", f"{HOST}:{self.port}",
            "--metrics-listen", f"{HOST}:{self.metrics_port}",
            "--state", str(self.state),
            "--snapshot-interval", "0.5",
        ]  # fmt: skip
        for limit in self.limits:
            args += ["--limit", limit]
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"basalt-discovery exited: {self.log.read_text()[-2000:]}")
            if "serving grpc://" in self.log.read_text()[offset:]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"basalt-discovery did not start: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None

    def metrics(self) -> str:
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    running = Service(
        tmp_path / "state",
        tmp_path / "discovery.log",
        free_port(HOST),
        free_port(HOST),
        limits=("client_rate=20", "client_burst=40", "affiliates_per_cluster=5"),
    )
    running.start()
    yield running
    running.stop()


def node(name: str) -> Affiliate:
    return Affiliate(f"id-{name}", name, "controlplane", ("10.0.0.1",), "0.1.0")


def new_keys() -> ClusterKeys:
    return ClusterKeys.from_secret(os.urandom(32), os.urandom(32))


def proof_pb(proof: Proof) -> discovery_pb2.Proof:
    return discovery_pb2.Proof(
        public_key=proof.public_key,
        timestamp=proof.timestamp,
        nonce=proof.nonce,
        signature=proof.signature,
    )


@contextlib.asynccontextmanager
async def raw(target: str) -> AsyncIterator[discovery_pb2_grpc.DiscoveryAsyncStub]:
    async with grpc.aio.insecure_channel(target.removeprefix("grpc://")) as channel:
        yield discovery_pb2_grpc.DiscoveryStub(channel)


async def refused(call: object) -> grpc.aio.AioRpcError:
    """The error of a call that must fail (a unary awaitable or a stream's first read)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            await call.read()
        else:
            await call  # type: ignore[misc]
    return caught.value


def signed_update(
    keys: ClusterKeys,
    affiliate_id: str,
    data: bytes,
    *,
    cluster_id: str | None = None,
    now: float | None = None,
) -> discovery_pb2.AffiliateUpdateRequest:
    digest = update_digest(data, [], 60)
    return discovery_pb2.AffiliateUpdateRequest(
        cluster_id=cluster_id or keys.wire_id,
        affiliate_id=affiliate_id,
        data=data,
        ttl_seconds=60,
        proof=proof_pb(keys.proof("AffiliateUpdate", affiliate_id, digest, now=now)),
    )


def test_stranger_cannot_read_write_or_delete(service: Service) -> None:
    victim, stranger = new_keys(), new_keys()

    async def main() -> None:
        async with DiscoveryClient(service.target, victim) as client:
            await client.update("n1", node("n1"))
        wire = victim.wire_id
        async with raw(service.target) as stub:
            attempts = {
                "list without proof": stub.List(discovery_pb2.ListRequest(cluster_id=wire)),
                "list with its own key": stub.List(
                    discovery_pb2.ListRequest(
                        cluster_id=wire, proof=proof_pb(stranger.proof("List"))
                    )
                ),
                "watch with its own key": stub.Watch(
                    discovery_pb2.WatchRequest(
                        cluster_id=wire, proof=proof_pb(stranger.proof("Watch"))
                    )
                ),
                "update with its own key": stub.AffiliateUpdate(
                    signed_update(stranger, "n1", b"forged", cluster_id=wire)
                ),
                "delete with its own key": stub.AffiliateDelete(
                    discovery_pb2.AffiliateDeleteRequest(
                        cluster_id=wire,
                        affiliate_id="n1",
                        proof=proof_pb(stranger.proof("AffiliateDelete", "n1")),
                    )
                ),
            }
            # The victim's public key (it is in every request) with the stranger's signature.
            forged = stranger.proof("AffiliateDelete", "n1")
            attempts["delete with the cluster's public key"] = stub.AffiliateDelete(
                discovery_pb2.AffiliateDeleteRequest(
                    cluster_id=wire,
                    affiliate_id="n1",
                    proof=proof_pb(
                        Proof(victim.public_key, forged.timestamp, forged.nonce, forged.signature)
                    ),
                )
            )
            # A victim's List proof re-used for a Delete (another method, same signature).
            listed = victim.proof("List")
            attempts["delete with a list proof"] = stub.AffiliateDelete(
                discovery_pb2.AffiliateDeleteRequest(
                    cluster_id=wire, affiliate_id="n1", proof=proof_pb(listed)
                )
            )
            for what, call in attempts.items():
                error = await refused(call)
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED, what
                assert wire not in (error.details() or ""), what
        async with DiscoveryClient(service.target, victim) as client:
            assert await client.list() == [("n1", node("n1"))]
        text = service.metrics()
        assert 'reason="proof_key"' in text and 'reason="proof_signature"' in text

    asyncio.run(main())


def test_replays_refused(service: Service) -> None:
    keys = new_keys()

    async def main() -> None:
        captured = signed_update(keys, "n1", keys.seal_data("n1", node("n1").to_json()))
        listed = discovery_pb2.ListRequest(
            cluster_id=keys.wire_id, proof=proof_pb(keys.proof("List"))
        )
        stale = signed_update(keys, "n1", b"\x01" + bytes(40), now=time.time() - 400)
        async with raw(service.target) as stub:
            await stub.AffiliateUpdate(captured)
            await stub.List(listed)
            for call in (stub.AffiliateUpdate(captured), stub.List(listed)):
                error = await refused(call)
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "replayed" in (error.details() or "")
            error = await refused(stub.AffiliateUpdate(stale))
            assert "outside the window" in (error.details() or "")
        # After a restart (its snapshot keeps the nonces) the replay is still refused.
        service.stop()
        service.start()
        async with raw(service.target) as stub:
            error = await refused(stub.AffiliateUpdate(captured))
            assert "replayed" in (error.details() or "")

    asyncio.run(main())


def test_tampered_records_refused_by_the_client(service: Service) -> None:
    keys = new_keys()

    async def main() -> None:
        good = keys.seal_data("n1", node("n1").to_json())
        flipped = bytearray(good)
        flipped[20] ^= 0x01
        moved = keys.seal_data("n1", node("n9").to_json())  # sealed for n1, stored as n9
        async with raw(service.target) as stub:
            await stub.AffiliateUpdate(signed_update(keys, "n1", good))
            await stub.AffiliateUpdate(signed_update(keys, "n2", bytes(flipped)))
            await stub.AffiliateUpdate(signed_update(keys, "n9", moved))
        async with DiscoveryClient(service.target, keys) as client:
            assert await client.list() == [("n1", node("n1"))]
            assert client.undecryptable == 2
            events = client.watch()
            assert set((await anext(events)).affiliates) == {"n1"}
            await events.aclose()

    asyncio.run(main())


async def _relay(port: int) -> tuple[asyncio.Server, int]:
    """A TCP relay on FLOOD_HOST that dials the service from FLOOD_HOST, so that the
    service sees the flood from another client address than the node's."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Cancelled when the test's loop ends with the connection open: nothing to report.
        with contextlib.suppress(asyncio.CancelledError, OSError):
            upstream_reader, upstream_writer = await asyncio.open_connection(
                HOST, port, local_addr=(FLOOD_HOST, 0)
            )
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(handle, FLOOD_HOST, 0)
    return server, server.sockets[0].getsockname()[1]


def test_oversize_and_flooding_refused_clearly(service: Service) -> None:
    keys, flooder_keys = new_keys(), new_keys()

    async def main() -> None:
        relay, relay_port = await _relay(service.port)
        node_client = DiscoveryClient(service.target, keys)
        flooder = DiscoveryClient(f"grpc://{FLOOD_HOST}:{relay_port}", flooder_keys)
        big = Affiliate("id", "h", "worker", extra={"blob": "x" * 20_000})
        with pytest.raises(DiscoveryRequestError, match=r"limit data_size=16384 exceeded"):
            await node_client.update("n1", big)
        many = Affiliate(
            "id", "h", "worker", tuple(f"10.0.{i // 250}.{i % 250}" for i in range(40))
        )
        with pytest.raises(DiscoveryRequestError, match=r"limit endpoints_per_affiliate=32"):
            await node_client.update("n1", many)
        for i in range(5):
            await node_client.update(f"n{i}", node(f"n{i}"))
        with pytest.raises(DiscoveryLimitError, match=r"limit affiliates_per_cluster=5 reached"):
            await node_client.update("n5", node("n5"))

        refusals = 0
        served = 0

        async def flood() -> None:
            nonlocal refusals
            for _ in range(300):
                try:
                    await flooder.list()
                except DiscoveryLimitError as exc:
                    assert "limit client_rate=20 reached" in str(exc)
                    refusals += 1

        async def meanwhile() -> None:
            nonlocal served
            for _ in range(10):
                assert len(await node_client.list()) == 5
                served += 1
                await asyncio.sleep(0.1)

        started = time.monotonic()
        await asyncio.gather(flood(), meanwhile())
        assert refusals > 200 and served == 10
        assert time.monotonic() - started < 30
        await node_client.close()
        await flooder.close()
        relay.close()
        text = service.metrics()
        assert 'reason="client_rate"' in text and 'reason="data_size"' in text
        assert 'reason="affiliates_per_cluster"' in text

    asyncio.run(main())


def test_restart_loses_no_record(service: Service) -> None:
    keys = new_keys()

    async def main() -> None:
        async with DiscoveryClient(service.target, keys) as client:
            for i in range(5):
                await client.update(f"n{i}", node(f"n{i}"))
            events = client.watch()
            assert len((await anext(events)).affiliates) == 5
            service.stop()  # SIGTERM: a last snapshot
            with pytest.raises(DiscoveryError):
                await asyncio.wait_for(anext(events), 20)
            service.start()
            assert [a for a, _ in await client.list()] == [f"n{i}" for i in range(5)]
            # Killed without a chance to write: what the last interval's snapshot held.
            await client.delete("n4")
            await asyncio.sleep(1.5)
            service.stop(signal.SIGKILL)
            service.start()
            assert [a for a, _ in await client.list()] == [f"n{i}" for i in range(4)]
            events = client.watch()
            assert len((await anext(events)).affiliates) == 4
            await events.aclose()

    asyncio.run(main())


def test_fleet_serves_discovery_with_its_certificate(tmp_path: Path) -> None:
    from basalt.fleet.core import Fleet, FleetOptions
    from basalt.fleet.server import start_discovery

    port = free_port(FLEET_HOST)
    fleet = Fleet(
        FleetOptions(
            data_dir=tmp_path / "fleet",
            host=FLEET_HOST,
            port=free_port(FLEET_HOST),
            discovery_port=port,
        )
    )
    keys = new_keys()

    async def main() -> None:
        server = await start_discovery(fleet)
        assert server is not None
        try:
            async with DiscoveryClient(
                f"grpcs://{FLEET_HOST}:{port}", keys, ca_pem=fleet.ca.crt
            ) as client:
                await client.update("n1", node("n1"))
                assert await client.list() == [("n1", node("n1"))]
            # Without the fleet's CA the TLS handshake fails: no record is served in clear.
            async with DiscoveryClient(f"grpcs://{FLEET_HOST}:{port}", keys, timeout=3) as bare:
                with pytest.raises(DiscoveryError):
                    await bare.list()
        finally:
            await server.stop(0)
        assert (tmp_path / "fleet" / "discovery" / "discovery.json").exists()

    try:
        asyncio.run(main())
    finally:
        fleet.close()
