"""Rollouts end to end: a process fleet of 8 machines in 2 clusters (3 control planes and
a worker each, real etcd), a release repository the fleet serves, and a continuous etcd
writer on each cluster while releases go out in waves.

- a good release reaches every machine, never more than one control plane of a cluster
  down at once; the writers' failed writes and longest gaps are reported;
- a broken release (its machined fails a health gate): the canary falls back, the rollout
  halts, no machine outside the canary is touched, the release is yanked, and it is never
  offered again to the machine where it failed;
- a multi-hop path (0.2.0 to 0.2.5 through 0.2.3) is stepped by the fleet.

Machines on 127.0.0.151-158, the fleet on .150. The tests run in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import basalt
from basalt.machinery.images import generate_signing_key, load_signing_key
from basalt.machinery.images.keys import trust_document
from basalt.machinery.releases.repository import Repository
from basalt.provision.bundle_from_tree import bundle_from_tree
from basalt.provision.process import create_machines, destroy
from tests.fakes.etcd_writer import EtcdWriter
from tests.fakes.fleet import FleetProcess
from tests.fakes.releases import apply_channel_cluster, broken_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SRC = Path(basalt.__file__).resolve().parent
V1 = basalt.__version__


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("rollouts")
    private, public = generate_signing_key()
    key = load_signing_key(private)
    repo = Repository.init(root / "repo")
    bundles = root / "bundles"
    bundles.mkdir()
    for version in ("0.2.0", "0.2.3", "0.2.5"):
        bundle_from_tree(SRC, bundles / f"{version}.tar", version, key)
    bundle_from_tree(broken_tree(SRC, root), bundles / "0.3.0.tar", "0.3.0", key)
    fleet = FleetProcess(
        root / "fleet", "127.0.0.150", 18800, root / "fleet.log",
        extra=("--releases", str(repo.directory)),
    )  # fmt: skip
    fleet.start()
    fleet.login()
    url = fleet.ctl("fleet", "token", "create", "--uses", "8", "--ttl", "1h").stdout.strip()
    record = asyncio.run(
        create_machines(
            "pool", 8, root / "pool", lambda *_: None, base_address="127.0.0.151",
            machined_args=("--fleet", url, "--boot-assessment-timeout", "10"),
        )
    )  # fmt: skip
    writers: dict[str, EtcdWriter] = {}
    try:
        fleet.wait_machines(8)
        trust = trust_document(public, "release")
        for name in ("ra", "rb"):
            exported = apply_channel_cluster(fleet, root, name, trust)
            secrets = yaml.safe_load((exported / "secrets.yaml").read_text())
            cps = [
                m["inventory"]["api_address"]
                for m in fleet.machines()
                if m["cluster"] == name and m["role"] == "controlplane"
            ]
            etcd = secrets["certs"]["etcd"]
            writers[name] = EtcdWriter(etcd["crt"], etcd["key"], cps, prefix=f"/{name}")
            writers[name].start()
        yield {"fleet": fleet, "repo": repo, "bundles": bundles, "writers": writers}
    finally:
        for writer in writers.values():
            writer.stop()
        fleet.stop()
        asyncio.run(destroy(record))


def publish(world: dict[str, Any], version: str, via: str = "") -> None:
    world["repo"].publish(world["bundles"] / f"{version}.tar", version, "x86_64", "stable", via)


def start(world: dict[str, Any], version: str, *args: str) -> int:
    out = world["fleet"].ctl("fleet", "rollout", "start", version, "--soak", "3s", *args)
    return int(out.stdout.strip())


def wait_rollout(fleet: FleetProcess, rollout: int, states: tuple[str, ...], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    found: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = fleet.get(f"/v1/rollouts/{rollout}")
        if found["state"] in states:
            return found
        time.sleep(1)
    raise AssertionError(f"rollout {rollout} not {states} in {timeout}s: {found}")


def versions(fleet: FleetProcess) -> dict[str, str]:
    return {m["uuid"]: m["inventory"].get("version", "") for m in fleet.machines()}


def control_planes_down_at_once(fleet: FleetProcess, since: int) -> int:
    """The most control planes of one cluster holding a reboot slot at the same time,
    from the audit log's takes and releases."""
    held: dict[str, set[str]] = {}
    most = 0
    for entry in fleet.get(f"/v1/audit?after={since}&limit=5000"):
        group = entry["target"]
        if not group.endswith("-controlplanes"):
            continue
        holder = entry["actor"].removeprefix("fleetlock:")
        if entry["action"] == "reboot.take":
            held.setdefault(group, set()).add(holder)
        elif entry["action"] == "reboot.release":
            held.get(group, set()).discard(holder)
        most = max(most, *(len(h) for h in held.values()), 0)
    return most


def last_audit(fleet: FleetProcess) -> int:
    entries = fleet.get("/v1/audit?after=0&limit=5000")
    return int(entries[-1]["id"]) if entries else 0


def test_a_good_release_reaches_every_machine_in_waves(world: dict[str, Any]) -> None:
    fleet = world["fleet"]
    assert set(versions(fleet).values()) == {V1}
    publish(world, "0.2.0")
    since = last_audit(fleet)
    started = time.monotonic()
    rollout = start(world, "0.2.0", "--waves", "50,100")
    done = wait_rollout(fleet, rollout, ("done", "halted"), 900)
    took = time.monotonic() - started
    report = {n: w.report() for n, w in world["writers"].items()}
    print(f"0.2.0 reached 8 machines in {took:.0f} s; etcd writers: {report}")
    messages = [(m["state"], m["message"]) for m in done["machineStates"]]
    assert done["state"] == "done" and done["done"] == 8, (done["reason"], messages)
    assert set(versions(fleet).values()) == {"0.2.0"}
    assert control_planes_down_at_once(fleet, since) == 1
    waves = [e for e in fleet.get(f"/v1/audit?after={since}&limit=5000")
             if e["action"] == "rollout.wave"]  # fmt: skip
    assert [w["detail"]["wave"] for w in waves] == [1, 2]
    for writer in world["writers"].values():
        assert writer.failed == 0, writer.report()
    # Promotion to beta: the fleet saw 8 machines run it, but not for the rule's 24 h.
    promote = ["release", "promote", str(world["repo"].directory), "0.2.0",
               "--from", "stable", "--to", "beta"]  # fmt: skip
    refused = fleet.ctl(*promote, check=False)
    assert refused.returncode != 0 and "it ran for 0.0 h, the rule wants 24.0 h" in refused.stderr
    fleet.ctl(*promote, "--force")  # as the fleet's admin
    forced = [e for e in fleet.get("/v1/audit?after=0&limit=5000")
              if e["action"] == "release.promote.forced"]  # fmt: skip
    assert [e["target"] for e in forced] == ["beta/0.2.0"]
    assert fleet.get("/v1/reboot-groups") == [] or all(
        not g["holders"] for g in fleet.get("/v1/reboot-groups")
    )


def test_a_broken_release_stops_at_the_canary(world: dict[str, Any]) -> None:
    fleet, repo = world["fleet"], world["repo"]
    publish(world, "0.3.0")
    before = versions(fleet)
    rollout = start(world, "0.3.0", "--canary-count", "1")
    halted = wait_rollout(fleet, rollout, ("halted", "done"), 600)
    assert halted["state"] == "halted" and "the canary failed" in halted["reason"], halted
    [canary] = [m for m in halted["machineStates"] if m["wave"] == 0]
    assert canary["state"] == "failed" and "fell back from 0.3.0" in canary["message"]
    others = [m for m in halted["machineStates"] if m["wave"] > 0]
    assert {m["state"] for m in others} == {"skipped"} and all(not m["target"] for m in others)
    time.sleep(3)
    assert versions(fleet) == before  # the canary is back on 0.2.0, nobody else moved
    assert [r.yanked for r in repo.releases("stable") if r.version == "0.3.0"] == [True]
    refused = fleet.ctl("fleet", "rollout", "start", "0.3.0", check=False)
    assert refused.returncode != 0 and "0.3.0 is yanked in channel stable" in refused.stderr
    evidence = fleet.get("/v1/releases/0.3.0/evidence")
    assert evidence["fallbacks"] == 1 and evidence["machines"] == 0
    shown = fleet.ctl("fleet", "rollout", "show", str(rollout)).stdout
    assert "halted" in shown and "fell back from 0.3.0" in shown


def test_a_multi_hop_path_is_stepped(world: dict[str, Any]) -> None:
    fleet = world["fleet"]
    publish(world, "0.2.3")
    publish(world, "0.2.5", via="0.2.3")
    since = last_audit(fleet)
    rollout = start(world, "0.2.5", "--cluster", "rb", "--waves", "100")
    done = wait_rollout(fleet, rollout, ("done", "halted"), 900)
    assert done["state"] == "done", done
    in_rb = {m["uuid"] for m in fleet.machines() if m["cluster"] == "rb"}
    now = versions(fleet)
    assert {now[u] for u in in_rb} == {"0.2.5"}
    assert {v for u, v in now.items() if u not in in_rb} == {"0.2.0"}
    takes = [e for e in fleet.get(f"/v1/audit?after={since}&limit=5000")
             if e["action"] == "reboot.take"]  # fmt: skip
    assert len(takes) == 2 * 4  # two hops on each machine of rb, one slot each
    listed = fleet.ctl("fleet", "rollout", "list").stdout
    assert "0.2.5" in listed and "[####################] 4/4" in listed
