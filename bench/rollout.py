"""Rollouts: how long a good release takes to cover 8 machines under the rollout policy,
against upgrading them one by one as an operator does without a fleet (``basaltctl
upgrade --wait``, node after node); and the blast radius of a bad release (machines it
touched) against the canary size.

The world is the one tests/integration/test_rollouts.py uses: a ``basalt-fleet`` process
(127.0.0.160) serving a release repository, 8 machined processes (127.0.0.161-168) in two
fleet clusters of 3 control planes and a worker each, real etcd. Bundles are this source
tree with other version strings; the bad one fails a health gate.

- good release: a rollout of 0.2.0 with the default policy (canary of 1, waves of 25, 50
  and 100 %, error budget of 1 failure, FleetLock slots) but ``--soak`` (default 10 s; the
  policy's default is 5 min, which would only add 4 x 5 min of waiting); then 0.2.3 node
  by node with ``basaltctl upgrade --wait``: the peer. Printed: both wall times and the
  ratio (below 1: the rollout is faster), with and without the soak time it waits on
  purpose (each wave soaks before the next opens).
- bad release: a rollout per canary size (``--canaries``, default 1,2) of a broken build;
  machines touched (an upgrade was sent) against the canary size. Target: never more
  than the canary (the canary goes one machine at a time, so a broken release stops at
  the first).

Figures (2026-12-05, this 2-core host, load 0.4 before): rollout 66.4 s for 8 machines
(40 s of it soak: canary + 3 waves x 10 s), one by one 29.5 s: 2.25x (0.89x without the
soak: two machines in flight, one per cluster, under the default budget of one failure).
Bad release: canary 1 touched 1 machine; canary 2 touched 1 (the first failure halts).

    python bench/rollout.py [--soak 10s] [--canaries 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import basalt
from basalt.machinery.durations import parse_duration
from basalt.machinery.images import generate_signing_key, load_signing_key
from basalt.machinery.images.keys import trust_document
from basalt.machinery.releases.repository import Repository
from basalt.provision.bundle_from_tree import bundle_from_tree
from basalt.provision.process import create_machines, destroy

if TYPE_CHECKING:
    from tests.fakes.fleet import FleetProcess

SRC = Path(basalt.__file__).resolve().parent


def _wait(fleet: FleetProcess, rollout: int, timeout: float = 1800) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found: dict[str, Any] = fleet.get(f"/v1/rollouts/{rollout}")
        if found["state"] not in ("running", "paused"):
            return found
        time.sleep(0.5)
    raise SystemExit(f"rollout {rollout} did not finish in {timeout:.0f} s")


def _good(fleet: FleetProcess, repo: Repository, root: Path, soak: str) -> None:
    bundles = root / "bundles"
    repo.publish(bundles / "0.2.0.tar", "0.2.0", "x86_64", "stable")
    started = time.monotonic()
    made = fleet.ctl("fleet", "rollout", "start", "0.2.0", "--soak", soak)
    rollout = _wait(fleet, int(made.stdout.strip()))
    rolled = time.monotonic() - started
    assert rollout["state"] == "done", rollout
    waiting = rollout["waves"] * (parse_duration(soak) or 0)
    print(
        f"rollout of 0.2.0 (default policy, soak {soak}): {rolled:.1f} s for 8, of which "
        f"{waiting:.0f} s is soak ({rollout['waves']} waves x {soak}) by design"
    )
    started = time.monotonic()
    for machine in sorted(fleet.machines(), key=lambda m: (m["cluster"], m["role"])):
        env = {
            **os.environ,
            "BASALTCONFIG": str(root / f"export-{machine['cluster']}" / "basaltconfig"),
        }
        address = machine["inventory"]["api_address"]
        subprocess.run(
            [sys.executable, "-m", "basalt.cli.main", "upgrade", "-n", address, "-e", address,
             "--image", str(bundles / "0.2.3.tar"), "--wait", "--timeout", "300"],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
    serial = time.monotonic() - started
    print(f"one by one (basaltctl upgrade --wait) to 0.2.3: {serial:.1f} s for 8")
    print(f"good release: rollout / one by one = {rolled / serial:.2f} "
          f"(without the soak: {(rolled - waiting) / serial:.2f})")  # fmt: skip


def _bad(fleet: FleetProcess, repo: Repository, root: Path, soak: str, sizes: list[int]) -> None:
    for index, canary in enumerate(sizes):
        version = f"0.3.{index}"
        repo.publish(root / "bundles" / f"{version}.tar", version, "x86_64", "stable")
        made = fleet.ctl("fleet", "rollout", "start", version, "--soak", soak,
                         "--canary-count", str(canary))  # fmt: skip
        halted = _wait(fleet, int(made.stdout.strip()))
        touched = sum(1 for m in halted["machineStates"] if m["target"])
        print(
            f"bad release {version}, canary {canary}: {halted['state']}, touched "
            f"{touched} machine(s) = {touched / canary:.2f}x the canary"
            f"{'' if touched <= canary else '  (TARGET MISSED: more than the canary)'}"
        )


def _bundles(root: Path, key: Any, bad: int) -> None:
    bundles = root / "bundles"
    bundles.mkdir()
    for version in ("0.2.0", "0.2.3"):
        bundle_from_tree(SRC, bundles / f"{version}.tar", version, key)
    from tests.fakes.releases import broken_tree

    broken = broken_tree(SRC, root)
    for index in range(bad):
        version = f"0.3.{index}"
        bundle_from_tree(broken, bundles / f"{version}.tar", version, key)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.fakes.fleet import FleetProcess
    from tests.fakes.releases import apply_channel_cluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak", default="10s")
    parser.add_argument("--canaries", default="1,2")
    args = parser.parse_args()
    canaries = [int(c) for c in args.canaries.split(",")]
    root = Path(tempfile.mkdtemp(prefix="basalt-bench-rollout-"))
    private, public = generate_signing_key()
    repo = Repository.init(root / "repo")
    _bundles(root, load_signing_key(private), len(canaries))
    fleet = FleetProcess(root / "fleet", "127.0.0.160", 18900, root / "fleet.log",
                         extra=("--releases", str(repo.directory)))  # fmt: skip
    fleet.start()
    fleet.login()
    url = fleet.ctl("fleet", "token", "create", "--uses", "8", "--ttl", "1h").stdout.strip()
    record = asyncio.run(
        create_machines("bench", 8, root / "pool", lambda *_: None, base_address="127.0.0.161",
                        machined_args=("--fleet", url, "--boot-assessment-timeout", "10"))
    )  # fmt: skip
    try:
        fleet.wait_machines(8)
        trust = trust_document(public, "release")
        for name in ("ba", "bb"):
            apply_channel_cluster(fleet, root, name, trust)
        print(f"8 machines in 2 clusters ready; load average {os.getloadavg()[0]:.2f}")
        _good(fleet, repo, root, args.soak)
        _bad(fleet, repo, root, args.soak, canaries)
    finally:
        fleet.stop()
        asyncio.run(destroy(record))
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
