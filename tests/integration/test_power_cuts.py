"""Power cuts during config applies and upgrades, in a process cluster.

A cut is SIGKILL of a node's whole machine: its launcher's process group (the launcher
plays the machine and its firmware) and every service it left behind, at a random moment
while an apply-config or an upgrade is in flight. The machine is then started again, as
after power returns, and must:

- boot and answer the API over mTLS (else it counts as **bricked**);
- run the last committed config: the one before the cut, or the one in flight when the
  cut came after the node wrote it (else a **lost config**). An apply whose RPC answered
  before the cut is committed: only the new config is right then;
- boot a slot that passes its health gates (a cut upgrade leaves the previous slot, or the
  new one on trial, which must come good or fall back).

Two workers are cut in turns, in parallel threads; a control plane keeps the cluster's
trust service. ``BASALT_POWER_CUTS`` sets the total (default 200). The test prints
``N cuts, B bricked, L lost configs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml

import basalt
from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.client.client import upload
from basalt.machinery.images import generate_signing_key, load_signing_key
from basalt.provision import common, process
from basalt.provision.bundle_from_tree import bundle_from_tree
from tests.fakes.cluster import LiveCluster, run, stop_cluster, upgradable_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CUTS = int(os.environ.get("BASALT_POWER_CUTS", "200"))
SRC = Path(basalt.__file__).resolve().parent
READY_TIMEOUT = 60.0
GATES_TIMEOUT = 20


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return generate_signing_key()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, signing: tuple[str, str]) -> dict[str, Path]:
    """Two versions: each upgrade installs the one the node does not run."""
    out = tmp_path_factory.mktemp("cut-bundles")
    made = {}
    for version in ("0.2.0", "0.3.0"):
        made[version] = out / f"{version}.tar"
        bundle_from_tree(SRC, made[version], version, load_signing_key(signing[0]))
    return made


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, signing: tuple[str, str]) -> Any:
    live = upgradable_cluster(
        tmp_path_factory.mktemp("cuts"),
        "cut",
        "127.0.0.161",
        trusted_key=signing[1],
        key_name="cuts",
        gates_timeout=GATES_TIMEOUT,
        workers=2,
    )
    yield live
    stop_cluster(live)


@dataclass
class Tally:
    cuts: int = 0
    bricked: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    #: What was in flight: "apply (answered)", "apply (cut)", "upgrade (cut)", ...
    kinds: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _node_record(cluster: LiveCluster, address: str) -> Any:
    return next(n for n in cluster.record.nodes if n.address == address)


def power_cut(cluster: LiveCluster, address: str) -> None:
    """SIGKILL the machine: the launcher's process group and services left behind.

    A real cut stops everything at once; here a process may be forked between the kill of
    its parent and the scan, so the scan repeats until nothing of the node is left."""
    node = _node_record(cluster, address)
    if process.is_ours(node):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.launcher_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    left = [node.launcher_pid]
    while time.monotonic() < deadline:
        left = [p for p in common.processes_naming(node.node_dir.encode()) if common.alive(p)]
        if not left and not common.alive(node.launcher_pid):
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    raise AssertionError(f"{address}: processes survived the cut: {left}")


def power_on(cluster: LiveCluster, address: str) -> None:
    node = _node_record(cluster, address)
    node.launcher_pid = process._launch(
        node, (*("--announce-interval", "1", "--member-ttl", "10"), *_extra_args())
    )


def _extra_args() -> tuple[str, ...]:
    return ("--boot-assessment-timeout", str(GATES_TIMEOUT))


def _environment(value: str) -> str:
    return (
        f"apiVersion: basalt.dev/v1alpha1\nkind: EnvironmentConfig\nvariables:\n  CUT: '{value}'\n"
    )


def _with_environment(config_yaml: str, value: str) -> str:
    """The node's config with its EnvironmentConfig replaced (or added)."""
    documents = [d for d in yaml.safe_load_all(config_yaml) if d]
    documents = [d for d in documents if d.get("kind") != "EnvironmentConfig"]
    documents.append(yaml.safe_load(_environment(value)))
    return yaml.safe_dump_all(documents, sort_keys=False)


def _cut_value(config_yaml: str) -> str:
    for document in yaml.safe_load_all(config_yaml):
        if document and document.get("kind") == "EnvironmentConfig":
            return str(document.get("variables", {}).get("CUT", ""))
    return ""


async def _running_config(cluster: LiveCluster, address: str) -> str:
    spec = await cluster.resource(address, "MachineConfigs", "v1alpha1")
    return str(spec["yaml"])


async def _wait_answering(cluster: LiveCluster, address: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client = await cluster.client(address)
        try:
            await client.machine.Version(common_pb2.Empty(), timeout=3)
            return True
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)
        finally:
            await client.close()
    return False


async def _wait_slot_settled(cluster: LiveCluster, address: str, timeout: float) -> str:
    """Until the running slot is good (not on trial); returns '' or what went wrong."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = await cluster.resource(address, "BootStatuses", "boot")
            if not last.get("onTrial"):
                return ""
        except (grpc.aio.AioRpcError, IndexError, KeyError):
            pass
        await asyncio.sleep(0.5)
    return f"slot still on trial after {timeout:g}s: {last}"


async def _apply(cluster: LiveCluster, address: str, data: str, done: threading.Event) -> None:
    client = await cluster.client(address)
    try:
        await client.machine.ApplyConfiguration(
            machine_pb2.ApplyConfigurationRequest(data=data.encode()), timeout=30
        )
        done.set()
    finally:
        await client.close()


async def _upgrade(cluster: LiveCluster, address: str, bundle: Path) -> None:
    client = await cluster.client(address)
    data = bundle.read_bytes()

    async def requests() -> AsyncIterator[machine_pb2.UpgradeRequest]:
        # the cuts alternate between two versions: every other upgrade is a downgrade
        yield machine_pb2.UpgradeRequest(options=machine_pb2.UpgradeOptions(allow_downgrade=True))
        for start in range(0, len(data), 64 * 1024):
            yield machine_pb2.UpgradeRequest(data=data[start : start + 64 * 1024])

    try:
        await upload(client.machine.Upgrade, requests(), timeout=60)
    finally:
        await client.close()


@dataclass
class Windows:
    """How long after its start an operation is cut: uniform in [0, window]. Each window
    adapts (longer after a cut that came before the operation's durable step, shorter
    after one that came after), so that cuts land on both sides however loaded the host."""

    apply: float = 0.15
    upgrade: float = 0.8

    def learn(self, kind: str) -> None:
        grow = "(cut" in kind
        if kind.startswith("upgrade"):
            self.upgrade = min(10.0, self.upgrade * (1.25 if grow else 0.9))
        else:
            self.apply = min(5.0, self.apply * (1.25 if grow else 0.9))


def one_cut(
    cluster: LiveCluster,
    address: str,
    bundles: dict[str, Path],
    rng: random.Random,
    index: int,
    windows: Windows,
) -> tuple[bool, str, str]:
    """An operation, a cut at a random moment in it, power on, checks.

    Returns (bricked, lost-config reason or '', what kind of cut it was)."""
    before = _cut_value(run(_running_config(cluster, address)))
    running = run(cluster.resource(address, "BootStatuses", "boot"))["version"]
    target = "0.3.0" if running == "0.2.0" else "0.2.0"
    bundle = bundles[target]
    value = f"{address}-{index}"
    upgrade = rng.random() < 0.3
    committed = threading.Event()

    async def operation() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            if upgrade:
                await _upgrade(cluster, address, bundle)
            else:
                config = await _running_config(cluster, address)
                await _apply(cluster, address, _with_environment(config, value), committed)

    worker = threading.Thread(target=run, args=(operation(),), daemon=True)
    worker.start()
    time.sleep(rng.uniform(0.0, windows.upgrade if upgrade else windows.apply))
    power_cut(cluster, address)
    worker.join(timeout=30)
    power_on(cluster, address)
    kind = "upgrade" if upgrade else ("apply (answered)" if committed.is_set() else "apply (cut)")
    if not run(_wait_answering(cluster, address, READY_TIMEOUT)):
        return True, "", kind
    after = _cut_value(run(_running_config(cluster, address)))
    if upgrade:
        expected = {before}
    elif committed.is_set():
        expected = {value}
    else:
        expected = {before, value}
    lost = ""
    if after not in expected:
        lost = f"cut {index}: config CUT={after!r}, expected one of {sorted(expected)}"
    settled = run(_wait_slot_settled(cluster, address, 3 * (GATES_TIMEOUT + 15)))
    if upgrade:
        status = run(cluster.resource(address, "BootStatuses", "boot"))
        kind += " (cut before the install)" if status["version"] == running else " (installed)"
    return bool(settled), lost, kind


def test_power_cuts_during_applies_and_upgrades_brick_nothing_and_lose_no_config(
    cluster: LiveCluster, bundles: dict[str, Path]
) -> None:
    tally = Tally()
    started = time.monotonic()

    def cut_loop(address: str, count: int, seed: int) -> None:
        rng = random.Random(seed)
        windows = Windows()
        for index in range(count):
            bricked, lost, kind = one_cut(cluster, address, bundles, rng, index, windows)
            windows.learn(kind)
            with tally.lock:
                tally.cuts += 1
                tally.kinds[kind] = tally.kinds.get(kind, 0) + 1
                if bricked:
                    tally.bricked.append(f"{address} cut {index}")
                if lost:
                    tally.lost.append(f"{address}: {lost}")
            if bricked:
                return  # a bricked node takes no more cuts

    workers = cluster.workers
    threads = [
        threading.Thread(target=cut_loop, args=(address, CUTS // len(workers), seed))
        for seed, address in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    print(
        f"\n{tally.cuts} cuts, {len(tally.bricked)} bricked, {len(tally.lost)} lost configs "
        f"({elapsed:.0f} s)"
    )
    for kind, count in sorted(tally.kinds.items()):
        print(f"  {count:4d}  {kind}")
    assert tally.cuts >= CUTS - CUTS % len(workers)
    assert not tally.bricked, tally.bricked
    assert not tally.lost, tally.lost
    if CUTS >= 100:  # the adaptive windows put cuts on both sides of each durable step
        for kind in (
            "apply (answered)",
            "apply (cut)",
            "upgrade (cut before the install)",
            "upgrade (installed)",
        ):
            assert tally.kinds.get(kind), f"no cut of kind {kind!r}: {tally.kinds}"
