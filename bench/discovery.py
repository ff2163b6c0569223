"""Discovery at scale: 1,000 clusters x 10 affiliates, a watch per affiliate (10,000 watch
streams), the service on one core; against etcd's watch with the same shape, in one run.

For each system, on one CPU core (sched_setaffinity; GOMAXPROCS=1 for etcd), with the
load generator on another:

(a) setup: 10,000 records written (sealed, signed AffiliateUpdates; etcd Puts of the
    same size), then 10,000 watch streams opened, each waiting for its first message
    (discovery: the snapshot; etcd: the `created` answer);
(b) steady state: updates at ``--rate`` a second for ``--seconds`` to random affiliates;
    the fan-out latency is from sending an update to each of its cluster's 10 watches
    receiving it (every delivery, and the last of each update's ten);
(c) the server's CPU (seconds, and percent of its core in (b)) and resident memory.

Target: discovery's p99 fan-out latency under 100 ms. The ratio to etcd is printed, not
judged: etcd's watch is the peer that a node would otherwise use (with a cluster's etcd,
not a shared service). etcd's data directory lies on tmpfs so that its fsyncs do not
count. Everything listens on loopback only.

    python bench/discovery.py [--clusters 1000] [--affiliates 10] [--rate 100]
                              [--seconds 20] [--address 127.0.0.166] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psutil

from basalt.machinery.api import discovery_pb2, discovery_pb2_grpc, etcd_pb2, etcd_pb2_grpc
from basalt.machinery.discovery import Affiliate, ClusterKeys
from basalt.machinery.discovery.crypto import Proof, update_digest

TARGET_P99_S = 0.100
CHANNELS = 20
SERVER_CORE, CLIENT_CORE = 0, 1

#: The messages of etcd's v3 watch (from etcd's published rpc.proto and kv.proto; only
#: the fields used here), compiled at run time with grpcio-tools. Their package is not
#: etcd's (machinery's etcd.proto holds some of those names); the wire does not care, and
#: the method is called by its path, /etcdserverpb.Watch/Watch.
ETCD_WATCH_PROTO = """
syntax = "proto3";
package basalt_bench_etcd_watch;
message WatchRequest { oneof request_union { WatchCreateRequest create_request = 1; } }
message WatchCreateRequest { bytes key = 1; bytes range_end = 2; }
message KeyValue { bytes key = 1; int64 create_revision = 2; int64 mod_revision = 3;
                   int64 version = 4; bytes value = 5; int64 lease = 6; }
message Event { int32 type = 1; KeyValue kv = 2; }
message WatchResponse { int64 watch_id = 2; bool created = 3; bool canceled = 4;
                        string cancel_reason = 6; repeated Event events = 11; }
"""


@dataclass
class Figures:
    name: str
    populate_s: float = 0.0
    watches_s: float = 0.0
    deliveries: list[float] = field(default_factory=list)
    complete: list[float] = field(default_factory=list)
    lost: int = 0
    cpu_setup_s: float = 0.0
    cpu_steady_s: float = 0.0
    steady_wall_s: float = 0.0
    rss_mib: float = 0.0


class Fanout:
    """Pending updates by their value: who sent it when, how many watches have it."""

    def __init__(self, watchers: int) -> None:
        self.watchers = watchers
        self.pending: dict[bytes, tuple[float, int]] = {}
        self.deliveries: list[float] = []
        self.complete: list[float] = []

    def sent(self, value: bytes) -> None:
        self.pending[value] = (time.perf_counter(), 0)

    def received(self, value: bytes) -> None:
        entry = self.pending.get(value)
        if entry is None:
            return
        started, seen = entry
        elapsed = time.perf_counter() - started
        self.deliveries.append(elapsed)
        seen += 1
        if seen == self.watchers:
            self.complete.append(elapsed)
            del self.pending[value]
        else:
            self.pending[value] = (started, seen)


def pinned(argv: list[str]) -> list[str]:
    """``argv`` run on SERVER_CORE (with taskset, so that every thread is pinned)."""
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(SERVER_CORE), *argv] if taskset else argv


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def channels(address: str) -> list[grpc.aio.Channel]:
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
    return [grpc.aio.insecure_channel(address, options=options) for _ in range(CHANNELS)]


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class System:
    """A server process, its clients' channels, and how to write and watch one record."""

    name = ""

    def __init__(self, host: str, root: Path) -> None:
        self.host = host
        self.root = root
        self.port = free_port(host)
        self.process: subprocess.Popen[bytes] | None = None
        self.pool: list[grpc.aio.Channel] = []

    def argv(self) -> list[str]:
        raise NotImplementedError

    async def start(self, env: dict[str, str] | None = None) -> psutil.Process:
        log = self.root / f"{self.name.split()[0]}.log"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                pinned(self.argv()),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited:\n{log.read_text()[-2000:]}")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            raise SystemExit(f"{self.name} did not listen:\n{log.read_text()[-2000:]}")
        self.pool = channels(f"{self.host}:{self.port}")
        return psutil.Process(self.process.pid)

    async def write(self, c: int, a: int, fanout: Fanout | None) -> None:
        raise NotImplementedError

    async def watch(self, c: int, a: int, opened: Callable[[], None], fanout: Fanout) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        for channel in self.pool:
            await channel.close(None)
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def run(
    system: System, clusters: int, affiliates: int, rate: float, seconds: float
) -> Figures:
    """(a), (b) and (c) of the module docstring for one system."""
    figures = Figures(system.name)
    server = await system.start()
    try:
        cpu = cpu_seconds(server)
        started = time.perf_counter()
        for first in range(0, clusters, 50):
            batch = range(first, min(first + 50, clusters))
            await asyncio.gather(
                *(system.write(c, a, None) for c in batch for a in range(affiliates))
            )
        figures.populate_s = time.perf_counter() - started

        fanout = Fanout(affiliates)
        ready = asyncio.Event()
        remaining = clusters * affiliates

        def opened() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                ready.set()

        started = time.perf_counter()
        watchers = [
            asyncio.create_task(system.watch(c, a, opened, fanout))
            for c in range(clusters)
            for a in range(affiliates)
        ]
        await asyncio.wait_for(ready.wait(), 600)
        figures.watches_s = time.perf_counter() - started
        figures.cpu_setup_s = cpu_seconds(server) - cpu
        figures.rss_mib = server.memory_info().rss / (1 << 20)

        count = int(rate * seconds)
        cpu = cpu_seconds(server)
        started = time.perf_counter()
        writes: list[asyncio.Task[None]] = []
        for i in range(count):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            c, a = random.randrange(clusters), random.randrange(affiliates)
            writes.append(asyncio.create_task(system.write(c, a, fanout)))
        await asyncio.gather(*writes)
        deadline = time.monotonic() + 10
        while fanout.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        figures.steady_wall_s = time.perf_counter() - started
        figures.cpu_steady_s = cpu_seconds(server) - cpu
        figures.deliveries, figures.complete = fanout.deliveries, fanout.complete
        figures.lost = len(fanout.pending)
        figures.rss_mib = max(figures.rss_mib, server.memory_info().rss / (1 << 20))
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    finally:
        await system.stop()
    return figures


# -- discovery ------------------------------------------------------------------------------
def _proof_pb(proof: Proof) -> discovery_pb2.Proof:
    return discovery_pb2.Proof(
        public_key=proof.public_key,
        timestamp=proof.timestamp,
        nonce=proof.nonce,
        signature=proof.signature,
    )


class Discovery(System):
    name = "basalt-discovery"

    def __init__(self, host: str, root: Path, clusters: int, affiliates: int) -> None:
        super().__init__(host, root)
        self.clusters, self.affiliates = clusters, affiliates
        self.keys = [
            ClusterKeys.from_secret(os.urandom(32), os.urandom(32)) for _ in range(clusters)
        ]

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "basalt.discovery", "serve"]
        argv += ["--listen", f"{self.host}:{self.port}"]
        # One client address sends everything: lift the per-client limits.
        for limit in (
            "client_rate=1000000",
            "client_burst=1000000",
            f"watches_per_client={self.clusters * self.affiliates + 10}",
        ):
            argv += ["--limit", limit]
        return argv

    def stub(self, c: int, a: int) -> discovery_pb2_grpc.DiscoveryAsyncStub:
        return discovery_pb2_grpc.DiscoveryStub(self.pool[(c * self.affiliates + a) % CHANNELS])

    async def write(self, c: int, a: int, fanout: Fanout | None) -> None:
        keys, name = self.keys[c], f"affiliate-{a}"
        record = Affiliate(name, f"node-{c}-{a}", "worker", (f"10.{c // 250}.{c % 250}.{a}",))
        data = keys.seal_data(name, record.to_json())
        endpoints = [keys.seal_endpoint(x) for x in record.addresses]
        proof = keys.proof("AffiliateUpdate", name, update_digest(data, endpoints, 1800))
        request = discovery_pb2.AffiliateUpdateRequest(
            cluster_id=keys.wire_id,
            affiliate_id=name,
            data=data,
            endpoints=endpoints,
            ttl_seconds=1800,
            proof=_proof_pb(proof),
        )
        if fanout is not None:
            fanout.sent(data)
        await self.stub(c, a).AffiliateUpdate(request, timeout=60)

    async def watch(self, c: int, a: int, opened: Callable[[], None], fanout: Fanout) -> None:
        keys = self.keys[c]
        request = discovery_pb2.WatchRequest(
            cluster_id=keys.wire_id, proof=_proof_pb(keys.proof("Watch"))
        )
        first = True
        async for message in self.stub(c, a).Watch(request):
            if first:
                first = False
                opened()
                continue
            for record in message.affiliates:
                fanout.received(record.data)


# -- etcd ------------------------------------------------------------------------------------
def etcd_watch_messages(root: Path) -> Any:
    """The message classes of ETCD_WATCH_PROTO, compiled into ``root``."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    (root / "etcd_watch.proto").write_text(ETCD_WATCH_PROTO)
    argv = ["protoc", f"-I{root}", f"--python_out={root}", str(root / "etcd_watch.proto")]
    if protoc.main(argv) != 0:
        raise SystemExit("protoc failed on the etcd watch subset")
    sys.path.insert(0, str(root))
    return importlib.import_module("etcd_watch_pb2")


class Etcd(System):
    name = "etcd watch"
    #: About the size of a sealed discovery record.
    VALUE = 300

    def __init__(self, host: str, root: Path, affiliates: int) -> None:
        super().__init__(host, root)
        self.affiliates = affiliates
        self.peer_port = free_port(host)
        self.data = Path(tempfile.mkdtemp(prefix="basalt-bench-etcd-", dir=tmpfs()))
        self.messages = etcd_watch_messages(root)

    def argv(self) -> list[str]:
        binary = shutil.which("etcd")
        if binary is None:
            raise SystemExit("etcd is not on PATH (make installs it)")
        client, peer = f"http://{self.host}:{self.port}", f"http://{self.host}:{self.peer_port}"
        return [
            binary,
            "--name=bench",
            f"--data-dir={self.data}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=bench={peer}",
            "--log-level=error",
        ]

    async def start(self, env: dict[str, str] | None = None) -> psutil.Process:
        server = await super().start({**os.environ, "GOMAXPROCS": "1"})
        kv = etcd_pb2_grpc.KVStub(self.pool[0])
        for attempt in range(100):  # the port is open before etcd serves
            try:
                await kv.Put(etcd_pb2.PutRequest(key=b"/ready", value=b""), timeout=5)
                break
            except grpc.aio.AioRpcError:
                if attempt == 99:
                    raise
                await asyncio.sleep(0.1)
        self.calls = [
            channel.stream_stream(
                "/etcdserverpb.Watch/Watch",
                request_serializer=self.messages.WatchRequest.SerializeToString,
                response_deserializer=self.messages.WatchResponse.FromString,
            )
            for channel in self.pool
        ]
        return server

    async def write(self, c: int, a: int, fanout: Fanout | None) -> None:
        value = os.urandom(self.VALUE)
        if fanout is not None:
            fanout.sent(value)
        key = f"/clusters/{c:05d}/affiliate-{a}".encode()
        stub = etcd_pb2_grpc.KVStub(self.pool[(c * self.affiliates + a) % CHANNELS])
        await stub.Put(etcd_pb2.PutRequest(key=key, value=value), timeout=60)

    async def watch(self, c: int, a: int, opened: Callable[[], None], fanout: Fanout) -> None:
        prefix = f"/clusters/{c:05d}/".encode()
        create = self.messages.WatchRequest(
            create_request=self.messages.WatchCreateRequest(
                key=prefix,
                range_end=prefix[:-1] + b"0",  # "/" + 1
            )
        )

        async def requests() -> AsyncIterator[Any]:
            yield create
            await asyncio.Event().wait()  # keep the stream open

        call = self.calls[(c * self.affiliates + a) % CHANNELS](requests())
        async for message in call:
            if message.created:
                opened()
            for event in message.events:
                fanout.received(event.kv.value)

    async def stop(self) -> None:
        await super().stop()
        shutil.rmtree(self.data, ignore_errors=True)


def tmpfs() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


# -- report ------------------------------------------------------------------------------------
def quantiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) < 2:
        return (samples[0],) * 3 if samples else (float("nan"),) * 3
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[98], max(samples)


def report(runs: list[Figures], clusters: int, affiliates: int, rate: float) -> bool:
    watches = clusters * affiliates
    print(
        f"{clusters} clusters x {affiliates} affiliates, {watches} watches, server on one core; "
        f"{rate:g} updates/s to random affiliates"
    )
    for f in runs:
        d50, d99, dmax = quantiles(f.deliveries)
        c50, c99, cmax = quantiles(f.complete)
        print(f"\n{f.name}")
        print(f"  write {watches} records".ljust(36) + f"{f.populate_s:8.2f} s")
        print(f"  open {watches} watches".ljust(36) + f"{f.watches_s:8.2f} s")
        print("  server CPU in setup".ljust(36) + f"{f.cpu_setup_s:8.2f} s")
        busy = 100 * f.cpu_steady_s / f.steady_wall_s if f.steady_wall_s else 0.0
        print(
            "  server CPU in steady state".ljust(36)
            + f"{f.cpu_steady_s:8.2f} s ({busy:.0f}% of a core)"
        )
        print("  server resident memory".ljust(36) + f"{f.rss_mib:8.1f} MiB")
        print(
            f"  fan-out, each delivery  p50 {1000 * d50:7.2f} ms  p99 {1000 * d99:7.2f} ms  "
            f"max {1000 * dmax:7.2f} ms  ({len(f.deliveries)} deliveries)"
        )
        print(
            f"  fan-out, all {affiliates} watches  p50 {1000 * c50:7.2f} ms  "
            f"p99 {1000 * c99:7.2f} ms  max {1000 * cmax:7.2f} ms  "
            f"({len(f.complete)} updates, {f.lost} incomplete)"
        )
    ours, peer = runs[0], runs[-1]
    p99 = quantiles(ours.complete)[1]
    ok = p99 < TARGET_P99_S and ours.lost == 0
    if len(runs) > 1:
        ratio = p99 / quantiles(peer.complete)[1]
        cpu = ours.cpu_steady_s / peer.cpu_steady_s if peer.cpu_steady_s else float("nan")
        mem = ours.rss_mib / peer.rss_mib
        print(
            f"\nratios to etcd: p99 fan-out {ratio:.2f}x, steady CPU {cpu:.2f}x, memory {mem:.2f}x"
        )
    verdict = "meets" if ok else "MISSES"
    print(f"target: p99 fan-out to all watches < {1000 * TARGET_P99_S:.0f} ms: {verdict}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--affiliates", type=int, default=10)
    parser.add_argument("--rate", type=float, default=100.0, help="updates a second in (b)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of (b)")
    parser.add_argument("--address", default="127.0.0.166", help="loopback address to serve on")
    parser.add_argument("--no-etcd", action="store_true", help="skip the etcd peer")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {CLIENT_CORE})
    shape = (args.clusters, args.affiliates, args.rate, args.seconds)
    with tempfile.TemporaryDirectory(prefix="basalt-bench-discovery-") as tmp:
        root = Path(tmp)
        systems: list[Callable[[], System]] = [
            lambda: Discovery(args.address, root, args.clusters, args.affiliates)
        ]
        if not args.no_etcd:
            systems.append(lambda: Etcd(args.address, root, args.affiliates))
        runs = [asyncio.run(run(make(), *shape)) for make in systems]
    ok = report(runs, args.clusters, args.affiliates, args.rate)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
