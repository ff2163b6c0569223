"""Upgrade time: the Upgrade API call until the node is healthy on its new slot, against a
cold boot of the same node (power off, power on, until healthy), measured in the same run.

A process cluster (1 control plane with etcd, 1 worker) trusts a signing key made for
the run; two bundles of this source tree (versions 0.2.0 and 0.3.0) are signed with it.
Each run upgrades the worker to the version it does not run — upload, verify, write the
inactive slot, reboot, pass the health gates — then cold-boots it: SIGTERM to its
machine (the launcher), start it again, until it is ready with its slot good. The upgrade
includes a reboot, so a cold boot is the floor it is compared with. Target: at most 1.5x
(median over the runs).

Nodes use loopback only (127.0.0.0/8, --base-address and the next address).

    python bench/upgrade.py [--runs N] [--base-address 127.0.0.171] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import basalt
from basalt.machinery.api import machine_pb2, resource_pb2
from basalt.machinery.client.client import Client, upload
from basalt.machinery.config import parse_patch
from basalt.machinery.images import generate_signing_key, load_signing_key
from basalt.machinery.images.keys import trust_document
from basalt.provision import common, process
from basalt.provision.bundle_from_tree import bundle_from_tree
from basalt.provision.process import ClusterRequest, create, destroy, load_context

TARGET_RATIO = 1.5
SRC = Path(basalt.__file__).resolve().parent
FAST = ("--announce-interval", "1", "--member-ttl", "10", "--boot-assessment-timeout", "60")


def trust_patch(public_pem: str) -> str:
    return trust_document(public_pem, "bench")


class Bench:
    def __init__(self, record: Any) -> None:
        self.record = record
        _, self.context = load_context(record).current()
        self.worker = next(n for n in record.nodes if n.type == "worker")

    async def client(self) -> Client:
        return await Client.connect(
            self.worker.address, ca=self.context.ca, crt=self.context.crt, key=self.context.key
        )

    async def boot_status(self) -> dict[str, Any] | None:
        try:
            client = await self.client()
        except Exception:
            return None
        try:
            answer = await client.resources.Get(
                resource_pb2.ResourceGetRequest(type="BootStatuses", id="boot"), timeout=3
            )
            return dict(json.loads(answer.messages[0].resource.spec_json))
        except Exception:
            return None
        finally:
            await client.close()

    async def healthy_on(self, version: str, timeout: float = 180) -> None:
        """Until the node is ready, running ``version`` on a good (not on trial) slot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self.boot_status()
            if status and status["version"] == version and not status["onTrial"]:
                try:
                    if await common.node_ready(self.context, self.worker.address):
                        return
                except Exception:
                    pass
            await asyncio.sleep(0.05)
        raise SystemExit(f"{self.worker.name} not healthy on {version} within {timeout:g}s")

    async def upgrade(self, bundle: Path, version: str) -> tuple[float, float]:
        """(seconds to the Upgrade answer: upload, verify, write the slot; total seconds)."""
        data = bundle.read_bytes()

        async def requests() -> AsyncIterator[machine_pb2.UpgradeRequest]:
            yield machine_pb2.UpgradeRequest(options=machine_pb2.UpgradeOptions())
            for start in range(0, len(data), 256 * 1024):
                yield machine_pb2.UpgradeRequest(data=data[start : start + 256 * 1024])

        started = time.monotonic()
        client = await self.client()
        try:
            await upload(client.machine.Upgrade, requests(), timeout=120)
        finally:
            await client.close()
        answered = time.monotonic() - started
        await self.healthy_on(version)
        return answered, time.monotonic() - started

    async def cold_boot(self, version: str) -> float:
        """Power the machine off (a graceful stop of its launcher), then on, until healthy."""
        node = self.worker
        os.kill(node.launcher_pid, signal.SIGTERM)
        while common.alive(node.launcher_pid):
            await asyncio.sleep(0.05)
        started = time.monotonic()
        node.launcher_pid = process._launch(node, FAST)
        await self.healthy_on(version)
        return time.monotonic() - started


async def measure(runs: int, base: str, work: Path) -> tuple[list[float], list[float]]:
    private, public = generate_signing_key()
    key = load_signing_key(private)
    bundles = {v: work / f"{v}.tar" for v in ("0.2.0", "0.3.0")}
    for version, path in bundles.items():
        bundle_from_tree(SRC, path, version, key)
    request = ClusterRequest(
        name="bench-upgrade",
        controlplanes=1,
        workers=1,
        base_address=base,
        version_contract="0.1",
        machined_args=FAST,
        patches=(parse_patch(trust_patch(public), "bench-trust"),),
    )
    record = await create(request, work / "cluster", lambda node, stage: None)
    bench = Bench(record)
    upgrades, boots = [], []
    try:
        for index in range(runs):
            version = ("0.2.0", "0.3.0")[index % 2]
            answered, took = await bench.upgrade(bundles[version], version)
            upgrades.append(took)
            boots.append(await bench.cold_boot(version))
            print(
                f"run {index + 1}: upgrade to {version} {took:.2f} s "
                f"(answered after {answered:.2f} s: upload, verify, write the slot), "
                f"cold boot {boots[-1]:.2f} s",
                flush=True,
            )
    finally:
        await destroy(record)
    return upgrades, boots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--base-address", default="127.0.0.171")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-upgrade-") as tmp:
        upgrades, boots = asyncio.run(measure(args.runs, args.base_address, Path(tmp)))
    up, boot = statistics.median(upgrades), statistics.median(boots)
    ratio = up / boot
    print(f"upgrade (API call -> healthy on the new slot): median {up:.2f} s "
          f"[{min(upgrades):.2f}-{max(upgrades):.2f}]")  # fmt: skip
    print(f"cold boot of the same node (power on -> healthy): median {boot:.2f} s "
          f"[{min(boots):.2f}-{max(boots):.2f}]")  # fmt: skip
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    print(f"ratio upgrade / cold boot: {ratio:.2f}x (target <= {TARGET_RATIO}x): {verdict}")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    return 1 if args.check and ratio > TARGET_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())
