"""etcd on Basalt: time to a 3-member etcd cluster, and write latency against a plain etcd
cluster started by hand with the same flags, measured in the same run.

(a) From `basaltctl cluster create --controlplanes 3 --workers 1` plus `basaltctl bootstrap
    -n CP1` (which answers "already bootstrapped" when `cluster create` did it) until
    `basaltctl etcd members -n CP1` lists 3 voting members and `basaltctl health -n
    CP1,CP2,CP3` passes. Target: 3 voting members at most 6 s after `cluster create`
    started. The peer, in the same run before the Basalt cluster starts: three plain etcd
    processes started by hand on other loopback addresses with a static
    --initial-cluster (TLS on client and peer URLs, certificates issued beforehand),
    timed from the first spawn until every member answers Status with a leader and no
    errors. The etcd events of each control plane (service state, bootstrap, learner
    join, promotion) are printed as a timeline, seconds from `cluster create`.
(b) p50/p99 of N sequential Puts of 256-byte values from one grpc.aio client (our
    etcd.proto stubs, mTLS) to the Basalt-managed etcd (client URL of CP1) and to a plain
    3-member etcd the script starts from the same binary on other loopback addresses,
    with its own CA and the flags read from the Basalt etcd's command line (TLS on client
    and peer URLs, and every tuning flag verbatim). Writes alternate between the two in
    blocks, and each cluster is addressed through a member of the same raft role (leader
    or follower). Target: Basalt's p50 at most 1.1x the plain cluster's.

Everything listens on loopback only (127.0.0.0/8).

    python bench/etcd_cluster.py [--writes N] [--base-address 127.0.0.231]
                                 [--peer-address 127.0.0.241] [--no-timeline] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from basalt.machinery.api import etcd_pb2, etcd_pb2_grpc
from basalt.machinery.pki import CertificateAndKey, generate_ca, issue_certificate

TARGET_VOTERS_S = 6.0
TARGET_P50_RATIO = 1.1
VALUE_SIZE = 256
BLOCK = 50
CLIENT_PORT, PEER_PORT = 2379, 2380
#: Flags that name this member, its files or its cluster; all others are copied verbatim.
PER_MEMBER_FLAGS = {
    "name",
    "data-dir",
    "listen-client-urls",
    "advertise-client-urls",
    "listen-peer-urls",
    "initial-advertise-peer-urls",
    "cert-file",
    "key-file",
    "trusted-ca-file",
    "peer-cert-file",
    "peer-key-file",
    "peer-trusted-ca-file",
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
}


# -- (a) the Basalt cluster ---------------------------------------------------------------
class Basaltctl:
    """basaltctl with this run's client config; a failure stops the bench with its message."""

    def __init__(self, basaltconfig: Path) -> None:
        self.argv = [str(Path(sys.executable).with_name("basaltctl")), "--basaltconfig"]
        self.argv.append(str(basaltconfig))

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.argv, *args], check=False, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise SystemExit(
                f"basaltctl {' '.join(args)} failed ({done.returncode}):\n{done.stderr.strip()}"
            )
        return done


def voting_members(table: str) -> int:
    """Members with LEARNER false in `etcd members` output."""
    rows = [line.split() for line in table.splitlines()[1:] if line.strip()]
    return sum(1 for row in rows if row and row[-1] == "false")


@dataclass
class Ready:
    #: wall clock (time.time) when `cluster create` started: node events are on it.
    wall_start: float
    created: float
    bootstrapped: float
    voters: float
    healthy: float
    #: `cluster create` bootstrapped etcd itself (bootstrap then answers "already").
    by_create: bool = False


def bring_up(ctl: Basaltctl, state_dir: Path, base_address: str, timeout: float) -> Ready:
    """Create the 3+1 cluster, bootstrap etcd, wait for 3 voters and health; seconds each."""
    wall_start, start = time.time(), time.perf_counter()
    shape = f"--controlplanes 3 --workers 1 --base-address {base_address}".split()
    ctl.run("cluster", "create", "--name", "bench-etcd", "--state-dir", str(state_dir), *shape)
    created = time.perf_counter() - start
    cps = controlplanes(state_dir)
    answer = ctl.run("bootstrap", "-n", cps[0], check=False)
    if answer.returncode != 0 and "already bootstrapped" not in answer.stderr:
        raise SystemExit(f"basaltctl bootstrap -n {cps[0]} failed:\n{answer.stderr.strip()}")
    bootstrapped = time.perf_counter() - start
    deadline = time.monotonic() + timeout
    voters = healthy = 0.0
    while time.monotonic() < deadline:
        if not voters:
            members = ctl.run("etcd", "members", "-n", cps[0], check=False)
            if members.returncode == 0 and voting_members(members.stdout) >= 3:
                voters = time.perf_counter() - start
        if voters and ctl.run("health", "-n", ",".join(cps), check=False).returncode == 0:
            healthy = time.perf_counter() - start
            return Ready(wall_start, created, bootstrapped, voters, healthy, answer.returncode != 0)
        time.sleep(0.1)
    last = ctl.run("etcd", "members", "-n", cps[0], check=False)
    raise SystemExit(f"etcd not ready within {timeout:.0f} s:\n{last.stdout}{last.stderr}")


@dataclass
class Step:
    seconds: float
    node: str
    message: str


async def etcd_timeline(basaltconfig: Path, cps: list[str], wall_start: float) -> list[Step]:
    """The etcd events of every control plane (service states, bootstrap, join, promotion),
    seconds after `cluster create` started, in order."""
    from basalt.machinery.api import machine_pb2
    from basalt.machinery.client.client import Client
    from basalt.machinery.client.config import load_client_config

    _, context = load_client_config(basaltconfig).current()
    steps = []
    for address in cps:
        client = await Client.connect(address, ca=context.ca, crt=context.crt, key=context.key)
        try:
            async for event in client.machine.Events(machine_pb2.EventsRequest(), timeout=10):
                if event.actor == "etcd":
                    steps.append(Step(event.timestamp - wall_start, address, event.message))
        finally:
            await client.close()
    return sorted(steps, key=lambda step: step.seconds)


def last_promotion(steps: list[Step]) -> float | None:
    """When the last of the joining members was promoted (the third voter), from events."""
    promoted = [s.seconds for s in steps if s.message.startswith("promoted to a voting")]
    return max(promoted) if len(promoted) >= 2 else None


def controlplanes(state_dir: Path) -> list[str]:
    record = json.loads((state_dir / "cluster.json").read_text())
    return [n["address"] for n in record["nodes"] if n["type"] == "controlplane"]


def basalt_etcd_argv(state_dir: Path, address: str) -> list[str]:
    """The command line of the Basalt-managed etcd listening on ``address``."""
    wanted = f"--listen-client-urls=https://{address}:{CLIENT_PORT}"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")[:-1]
        except OSError:
            continue
        ours = any(a.startswith(f"--data-dir={state_dir.resolve()}") for a in argv)
        if argv and Path(argv[0]).name == "etcd" and wanted in argv and ours:
            return argv
    raise SystemExit(f"no Basalt etcd process for {address} under {state_dir}")


def shared_flags(argv: list[str]) -> list[str]:
    """The flags of ``argv`` that do not name the member: copied to the peer as they are."""
    kept = []
    for arg in argv[1:]:
        name = arg.removeprefix("--").split("=", 1)[0]
        if name not in PER_MEMBER_FLAGS:
            kept.append(arg)
    return kept


# -- (b) the plain etcd cluster -------------------------------------------------------------
@dataclass
class Peer:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log: Path


def prepare_peers(
    binary: str, addresses: list[str], flags: list[str], root: Path
) -> tuple[list[tuple[str, str, list[str], Path]], CertificateAndKey, CertificateAndKey]:
    """A 3-member static etcd cluster's command lines with its own CA, certificates
    written: (name, address, argv, home) each, the CA and a client pair."""
    ca = generate_ca("bench-etcd")
    names = [f"peer{i + 1}" for i in range(len(addresses))]
    initial = ",".join(
        f"{n}=https://{a}:{PEER_PORT}" for n, a in zip(names, addresses, strict=True)
    )
    prepared = []
    for name, address in zip(names, addresses, strict=True):
        home = root / name
        home.mkdir(parents=True)
        sans = [address, name, "localhost", "127.0.0.1"]
        files = {}
        for kind in ("server", "peer"):
            pair = issue_certificate(ca, name, server=True, client=True, sans=sans)
            assert pair.key is not None
            (home / f"{kind}.crt").write_text(pair.crt)
            (home / f"{kind}.key").write_text(pair.key)
            (home / f"{kind}.key").chmod(0o600)
            files[kind] = home / kind
        (home / "ca.crt").write_text(ca.crt)
        client, peer = f"https://{address}:{CLIENT_PORT}", f"https://{address}:{PEER_PORT}"
        argv = [
            binary,
            f"--name={name}",
            f"--data-dir={home / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--cert-file={files['server']}.crt",
            f"--key-file={files['server']}.key",
            f"--trusted-ca-file={home / 'ca.crt'}",
            f"--peer-cert-file={files['peer']}.crt",
            f"--peer-key-file={files['peer']}.key",
            f"--peer-trusted-ca-file={home / 'ca.crt'}",
            "--initial-cluster-token=bench-peer",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            *flags,
        ]
        prepared.append((name, address, argv, home))
    return prepared, ca, issue_certificate(ca, "bench", client=True)


def spawn_peers(prepared: list[tuple[str, str, list[str], Path]]) -> list[Peer]:
    peers = []
    for name, address, argv, home in prepared:
        log = home / "etcd.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        peers.append(Peer(name, address, process, log))
    return peers


def start_peers(
    binary: str, addresses: list[str], flags: list[str], root: Path
) -> tuple[list[Peer], CertificateAndKey, CertificateAndKey]:
    """Start a 3-member etcd cluster with its own CA; returns it, the CA and a client pair."""
    prepared, ca, client = prepare_peers(binary, addresses, flags, root)
    return spawn_peers(prepared), ca, client


async def static_formation(binary: str, addresses: list[str], root: Path) -> float:
    """Seconds from the first spawn of a hand-started static 3-member etcd (TLS, no extra
    flags, certificates issued beforehand) until every member is healthy."""
    prepared, ca, client = prepare_peers(binary, addresses, [], root)
    start = time.perf_counter()
    peers = spawn_peers(prepared)
    targets = [Target("static", p.address, ca.crt, client) for p in peers]
    try:
        await wait_healthy(targets, peers, poll=0.02)
        return time.perf_counter() - start
    finally:
        for target in targets:
            await target.close()
        stop_peers(peers)


def stop_peers(peers: list[Peer]) -> None:
    """Stop the etcd processes this script started (and only those)."""
    for peer in peers:
        if peer.process.poll() is None:
            peer.process.send_signal(signal.SIGTERM)
    for peer in peers:
        try:
            peer.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            peer.process.kill()
            peer.process.wait()


# -- the write benchmark ----------------------------------------------------------------------
class Target:
    """One etcd member's client URL with a grpc.aio channel (mTLS) and our stubs."""

    def __init__(self, label: str, address: str, ca: str, client: CertificateAndKey) -> None:
        assert client.key is not None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.encode(),
            private_key=client.key.encode(),
            certificate_chain=client.crt.encode(),
        )
        self.label = label
        self.address = address
        # Short reconnect backoff: a member that is not listening yet is retried within
        # 50 ms, so the formation time is not rounded up by gRPC's 1 s default backoff.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 100),
        ]
        self.channel = grpc.aio.secure_channel(f"{address}:{CLIENT_PORT}", credentials, options)
        self.kv = etcd_pb2_grpc.KVStub(self.channel)
        self.maintenance = etcd_pb2_grpc.MaintenanceStub(self.channel)
        self.samples: list[float] = []

    async def is_leader(self) -> bool:
        status = await self.maintenance.Status(etcd_pb2.StatusRequest(), timeout=5)
        return status.leader == status.header.member_id

    async def healthy(self) -> bool:
        try:
            status = await self.maintenance.Status(etcd_pb2.StatusRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return False
        return status.leader != 0 and not status.errors

    async def put(self, index: int, value: bytes, *, keep: bool = True) -> None:
        key = f"/bench/{self.label}/{index:05d}".encode()
        start = time.perf_counter()
        await self.kv.Put(etcd_pb2.PutRequest(key=key, value=value), timeout=10)
        if keep:
            self.samples.append(time.perf_counter() - start)

    async def close(self) -> None:
        await self.channel.close(None)


async def wait_healthy(
    targets: list[Target], peers: list[Peer], timeout: float = 30, poll: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for peer in peers:
            if peer.process.poll() is not None:
                raise SystemExit(f"{peer.name} exited:\n{peer.log.read_text()[-3000:]}")
        if all(await asyncio.gather(*(t.healthy() for t in targets))):
            return
        await asyncio.sleep(poll)
    raise SystemExit(f"the plain etcd cluster was not healthy within {timeout:.0f} s")


async def same_role(basalt: Target, candidates: list[Target]) -> Target:
    """The plain member whose raft role (leader or follower) matches Basalt's target."""
    leader = await basalt.is_leader()
    for candidate in candidates:
        if await candidate.is_leader() == leader:
            return candidate
    raise SystemExit("no plain etcd member in the same raft role")


async def measure(basalt: Target, plain: Target, writes: int) -> None:
    value = os.urandom(VALUE_SIZE)
    for target in (basalt, plain):  # warm up: TLS handshake, first allocations
        for index in range(10):
            await target.put(index, value, keep=False)
    for first in range(0, writes, BLOCK):
        for target in (basalt, plain):
            for index in range(first, min(first + BLOCK, writes)):
                await target.put(index, value)


def percentiles(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[98]


async def latency(
    state_dir: Path, cp1: str, peer_addresses: list[str], root: Path, writes: int
) -> tuple[dict[str, tuple[float, float]], list[str], bool]:
    from basalt.machinery.config.secrets import load_secrets

    argv = basalt_etcd_argv(state_dir, cp1)
    flags = shared_flags(argv)
    secrets = load_secrets((state_dir / "secrets.yaml").read_text(), "secrets.yaml")
    etcd_ca = CertificateAndKey(secrets.certs.etcd.crt, secrets.certs.etcd.key)
    basalt = Target("basalt", cp1, etcd_ca.crt, issue_certificate(etcd_ca, "bench", client=True))
    peers: list[Peer] = []
    plain_targets: list[Target] = []
    try:
        peers, peer_ca, peer_client = start_peers(argv[0], peer_addresses, flags, root)
        plain_targets = [Target("plain", p.address, peer_ca.crt, peer_client) for p in peers]
        await wait_healthy(plain_targets, peers)
        plain = await same_role(basalt, plain_targets)
        leader = await basalt.is_leader()
        await measure(basalt, plain, writes)
        figures = {
            f"Basalt etcd ({cp1})": percentiles(basalt.samples),
            f"plain etcd ({plain.address})": percentiles(plain.samples),
        }
        return figures, flags, leader
    finally:
        for target in [basalt, *plain_targets]:
            await target.close()
        stop_peers(peers)


def report_formation(ready: Ready, steps: list[Step], static: float, *, timeline: bool) -> bool:
    """Print (a); True when the voters target is met."""
    print("(a) 3+1 cluster to a healthy 3-member etcd (seconds from `cluster create`)")
    print(f"  cluster create returned   {ready.created:6.2f} s")
    note = " (cluster create had bootstrapped etcd already)" if ready.by_create else ""
    print(f"  bootstrap returned        {ready.bootstrapped:6.2f} s{note}")
    print(f"  3 voting members          {ready.voters:6.2f} s (first seen by `etcd members`)")
    promoted = last_promotion(steps)
    voters = promoted if promoted is not None else ready.voters
    if promoted is not None:
        print(f"  3rd voter promoted        {promoted:6.2f} s (node event)")
    print(f"  health passes on all CPs  {ready.healthy:6.2f} s")
    print(f"  peer: static 3-member etcd started by hand, spawn -> all healthy {static:6.2f} s")
    ok_voters = voters <= TARGET_VOTERS_S
    verdict = "meets" if ok_voters else "MISSES"
    print(
        f"  3 voters at {voters:.2f} s = {voters / static:.1f}x the static peer: "
        f"{verdict} the {TARGET_VOTERS_S:.0f} s target"
    )
    if timeline:
        print("  etcd events (s after `cluster create`):")
        for step in steps:
            print(f"    {step.seconds:6.2f}  {step.node:<15} {step.message}")
    print()
    return ok_voters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=300, help="Puts per cluster")
    parser.add_argument("--base-address", default="127.0.0.231", help="first Basalt node")
    parser.add_argument("--peer-address", default="127.0.0.241", help="first plain member")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up on (a) after")
    parser.add_argument("--no-timeline", action="store_true", help="omit the etcd events")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()

    first_peer = ipaddress.ip_address(args.peer_address)
    peer_addresses = [str(first_peer + i) for i in range(3)]
    binary = shutil.which("etcd")
    if binary is None:
        raise SystemExit("no etcd binary on PATH (the plain peer runs the same binary)")
    with tempfile.TemporaryDirectory(prefix="basalt-bench-etcd-") as tmp:
        state_dir = Path(tmp) / "cluster"
        basaltconfig = Path(tmp) / "basaltconfig"
        ctl = Basaltctl(basaltconfig)
        static = asyncio.run(static_formation(binary, peer_addresses, Path(tmp) / "static"))
        try:
            ready = bring_up(ctl, state_dir, args.base_address, args.timeout)
            cps = controlplanes(state_dir)
            steps = asyncio.run(etcd_timeline(basaltconfig, cps, ready.wall_start))
            figures, flags, leader = asyncio.run(
                latency(state_dir, cps[0], peer_addresses, Path(tmp) / "plain", args.writes)
            )
        finally:
            if (state_dir / "cluster.json").exists():
                ctl.run(
                    "cluster",
                    "destroy",
                    "--name",
                    "bench-etcd",
                    "--state-dir",
                    str(state_dir),
                    check=False,
                )

    ok_voters = report_formation(ready, steps, static, timeline=not args.no_timeline)

    role = "leader" if leader else "follower"
    print(
        f"(b) {args.writes} sequential Puts of {VALUE_SIZE} B, one grpc.aio client, mTLS, "
        f"through a {role} of each cluster; blocks of {BLOCK} alternate"
    )
    print(f"  shared flags: {' '.join(flags) or '(none)'}")
    print(f"  {'cluster':<32} {'p50':>9} {'p99':>9}")
    for label, (p50, p99) in figures.items():
        print(f"  {label:<32} {p50 * 1000:>7.2f}ms {p99 * 1000:>7.2f}ms")
    (basalt_p50, basalt_p99), (plain_p50, plain_p99) = figures.values()
    ratio = basalt_p50 / plain_p50
    ok_ratio = ratio <= TARGET_P50_RATIO
    verdict = "meets" if ok_ratio else "MISSES"
    print(
        f"  Basalt/plain: p50 {ratio:.2f}x, p99 {basalt_p99 / plain_p99:.2f}x: "
        f"{verdict} the {TARGET_P50_RATIO:.1f}x p50 target"
    )
    return 0 if (ok_voters and ok_ratio) or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
