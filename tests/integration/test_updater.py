"""The node updater end to end, with no fleet managing the node: a container-mode node
follows the ``stable`` channel of a TUF repository served over HTTP on loopback, takes a
reboot slot from the fleet binary's FleetLock server, steps a multi-hop upgrade path by
itself, falls back from a broken release and never takes it again, and waits for its
maintenance window.

One node (127.0.0.141), the repository on 127.0.0.142, the fleet on 127.0.0.140. The
tests run in order on the same node, as its weeks would.
"""

from __future__ import annotations

import datetime as dt
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import basalt
from basalt.machinery.config.patch import parse_patch
from basalt.machinery.images import generate_signing_key, load_signing_key
from basalt.machinery.releases.repository import Repository
from basalt.provision.bundle_from_tree import bundle_from_tree
from tests.fakes.cluster import LiveCluster, run, stop_cluster, upgradable_cluster
from tests.fakes.fleet import FleetProcess
from tests.fakes.releases import broken_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SRC = Path(basalt.__file__).resolve().parent
V1 = basalt.__version__
NODE = "127.0.0.141"
GATES_TIMEOUT = 10
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("updater")
    private, public = generate_signing_key()
    key = load_signing_key(private)
    repo = Repository.init(root / "repo")
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.142", 0), functools.partial(_Quiet, directory=str(repo.directory))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    repo_url = f"http://127.0.0.142:{httpd.server_address[1]}/"
    fleet = FleetProcess(root / "fleet", "127.0.0.140", 18700, root / "fleet.log")
    fleet.start()
    fleet.login()
    token = fleet.ctl("fleet", "user", "create", "updater", "--role", "fleet:reboot")
    update = {
        "apiVersion": "basalt.dev/v1alpha1",
        "kind": "UpdateConfig",
        "repository": repo_url,
        "root": (repo.metadata / "1.root.json").read_text(),
        "channel": "stable",
        "mode": "auto",
        "interval": "2s",
        "rebootCoordinator": {
            "url": fleet.url,
            "group": "edge",
            "token": token.stdout.strip().splitlines()[-1],
            "ca": (fleet.data_dir / "ca.crt").read_text(),
        },
    }
    cluster = upgradable_cluster(
        root / "cluster",
        "upd",
        NODE,
        trusted_key=public,
        key_name="release",
        gates_timeout=GATES_TIMEOUT,
        controlplanes=1,
        workers=0,
        patches=(parse_patch(json.dumps(update), "update"),),
    )
    bundles = root / "bundles"
    bundles.mkdir()
    for version in ("0.1.3", "0.2.1", "0.2.2", "0.2.6"):
        bundle_from_tree(SRC, bundles / f"{version}.tar", version, key)
    bundle_from_tree(broken_tree(SRC, root), bundles / "0.3.0.tar", "0.3.0", key)
    other, _ = generate_signing_key()
    bundle_from_tree(SRC, bundles / "0.2.5.tar", "0.2.5", load_signing_key(other))
    try:
        yield {"repo": repo, "cluster": cluster, "fleet": fleet, "bundles": bundles}
    finally:
        stop_cluster(cluster)
        fleet.stop()
        httpd.shutdown()
        httpd.server_close()


def status(cluster: LiveCluster) -> dict[str, Any]:
    return run(cluster.resource(NODE, "UpdateStatuses", "node"))


def wait_status(
    cluster: LiveCluster, ok: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = status(cluster)
            if ok(last):
                return last
        except Exception:
            pass  # rebooting
        time.sleep(0.5)
    raise AssertionError(f"{what}: not reached in {timeout}s; last update status: {last}")


def ctl(cluster: LiveCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BASALTCTL, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "BASALTCONFIG": str(Path(cluster.record.state_dir) / "basaltconfig")},
        check=False,
        timeout=600,
    )


def holders(fleet: FleetProcess) -> list[str]:
    groups = fleet.get("/v1/reboot-groups")
    return [h for g in groups if g["group"] == "edge" for h in g["holders"]]


def publish(world: dict[str, Any], version: str, via: str = "") -> None:
    world["repo"].publish(world["bundles"] / f"{version}.tar", version, "x86_64", "stable", via)


def test_nothing_to_take_is_up_to_date(world: dict[str, Any]) -> None:
    found = wait_status(world["cluster"], lambda s: s["state"] == "up-to-date", 60, "up to date")
    assert found["current"] == V1 and found["mode"] == "auto" and found["channel"] == "stable"


def test_a_multi_hop_path_is_stepped_by_itself(world: dict[str, Any]) -> None:
    """0.2.1 is reached from below 0.1.3 only through 0.1.3: two upgrades, each holding
    the reboot slot until the new version passed its health gates."""
    cluster, fleet = world["cluster"], world["fleet"]
    publish(world, "0.1.3")
    publish(world, "0.2.1", via="0.1.3")
    seen = wait_status(cluster, lambda s: s["nextHop"] == "0.1.3", 30, "next hop 0.1.3")
    assert seen["path"] == ["0.1.3", "0.2.1"] and seen["available"] == "0.2.1"
    found = wait_status(
        cluster,
        lambda s: s["current"] == "0.2.1" and s["state"] == "up-to-date" and not s["slotHeld"],
        300,
        "0.2.1 through 0.1.3",
    )
    assert found["refused"] == []
    assert holders(fleet) == []  # given back after the gates passed
    audit = fleet.get("/v1/audit?after=0&limit=1000")
    actions = [e["action"] for e in audit if e["action"].startswith("reboot.")]
    assert actions[-4:] == ["reboot.take", "reboot.release"] * 2


def test_a_bundle_signed_by_an_untrusted_key_is_refused(world: dict[str, Any]) -> None:
    cluster = world["cluster"]
    publish(world, "0.2.5")
    found = wait_status(cluster, lambda s: "signing key" in s["lastError"], 60, "refused 0.2.5")
    assert found["current"] == "0.2.1" and found["state"] == "error"
    assert holders(world["fleet"]) == []  # refused before a slot was taken
    world["repo"].yank("0.2.5")
    wait_status(cluster, lambda s: s["state"] == "up-to-date", 60, "0.2.5 yanked")


def test_a_broken_release_falls_back_and_is_never_taken_again(world: dict[str, Any]) -> None:
    cluster = world["cluster"]
    publish(world, "0.3.0")
    found = wait_status(
        cluster,
        lambda s: "0.3.0" in s["refused"] and s["state"] == "up-to-date" and not s["slotHeld"],
        400,
        "0.3.0 refused after its fallback",
    )
    assert found["current"] == "0.2.1" and found["nextHop"] == ""
    boot = run(cluster.resource(NODE, "BootStatuses", "boot"))
    assert boot["fellBackFrom"] and boot["previousVersion"] == "0.3.0"
    assert holders(world["fleet"]) == []
    time.sleep(8)  # several checks later: still not taken again
    again = status(cluster)
    assert again["current"] == "0.2.1" and again["nextHop"] == ""


def test_nothing_starts_until_the_window_opens(world: dict[str, Any]) -> None:
    """A window that opens at the first minute at least 45 s away, for one minute: 0.2.2
    waits for it."""
    cluster = world["cluster"]
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=45 + 59)
    opens = soon.replace(second=0, microsecond=0)
    patch = json.dumps(
        {
            "apiVersion": "basalt.dev/v1alpha1",
            "kind": "UpdateConfig",
            "windows": [{"cron": f"{opens.minute} {opens.hour} * * *", "duration": "1m"}],
        }
    )
    done = ctl(cluster, "patch", "machineconfig", "-n", NODE, "-p", patch)
    assert done.returncode == 0 and "applies live" in done.stdout, done
    publish(world, "0.2.2")
    waiting = wait_status(
        cluster, lambda s: s["state"] == "waiting-window" and s["nextHop"] == "0.2.2", 60, "wait"
    )
    assert waiting["nextWindow"] == opens.isoformat(timespec="seconds")
    while dt.datetime.now(dt.UTC) < opens - dt.timedelta(seconds=3):
        assert status(cluster)["current"] == "0.2.1"
        time.sleep(2)
    found = wait_status(cluster, lambda s: s["current"] == "0.2.2", 300, "0.2.2 in the window")
    assert dt.datetime.now(dt.UTC) >= opens
    assert found["refused"] == ["0.3.0"]


def test_manual_mode_checks_and_upgrades_only_when_asked(world: dict[str, Any]) -> None:
    cluster = world["cluster"]
    patch = json.dumps(
        {"apiVersion": "basalt.dev/v1alpha1", "kind": "UpdateConfig", "mode": "manual"}
    )
    assert ctl(cluster, "patch", "machineconfig", "-n", NODE, "-p", patch).returncode == 0
    wait_status(cluster, lambda s: s["state"] == "manual", 30, "manual")
    publish(world, "0.2.6")
    time.sleep(5)  # no interval checks in manual mode
    assert status(cluster)["nextHop"] == ""
    checked = ctl(cluster, "update", "-n", NODE)
    assert checked.returncode == 0, checked.stderr
    assert "0.2.6 is available (path: 0.2.6); --apply takes it now" in checked.stdout
    assert status(cluster)["current"] == "0.2.2"
    applied = ctl(cluster, "update", "--apply", "-n", NODE)
    assert applied.returncode == 0 and "upgrading to 0.2.6" in applied.stdout, applied.stderr
    wait_status(cluster, lambda s: s["current"] == "0.2.6", 120, "0.2.6 on request")
    again = ctl(cluster, "update", "-n", NODE)
    assert "up to date: 0.2.6 is the newest release of stable" in again.stdout, again
