"""Add machines with no typing: the fleet builds a join token's installation image, and a
fresh machine booted from it enrols by itself (issue 19).

The fleet (``--advertise 10.0.2.2``, its image factory's stage cache seeded with the
schematic-independent stages of ``_out/cache``) makes a join token with a label, then
builds its installation image: ``POST /v1/join-tokens/ID/image``. The schematic's kernel
arguments end with ``basalt.fleet=URL`` carrying the token. The test downloads
``disk.qcow2`` through ``/factory/image/...`` (checked against the factory's sha256) and
boots a qcow2 overlay of it under OVMF through systemd-boot, on QEMU's user network with
no port forward and no kernel argument of its own: the disk's boot entry is all the
machine has. It enrols, links, and reports the installation image's schematic id; the
token's label is on it. The token is nowhere in the fleet's log, the factory's JSON
listing or its index page (``token=***``), and the audit log has the image request by
token id and schematic id. Talks only to 127.0.0.1 and QEMU's user network.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from basalt.imager.qemu import free_port
from tests.fakes.fleet import FleetProcess
from tests.vm.conftest import Timings
from tests.vm.machine import Vm, _launch, uefi_disk_command

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
#: Stages that do not depend on the schematic: the factory's cache starts with them (as
#: in tests/integration/test_factory.py), so it builds only ``boot`` and ``disk``.
SHARED = ("fetch-debs", "fetch-wheels", "unpack", "sources", "rootfs", "squashfs")
#: A seeded build takes 15-30 s; an edit to the sources since ``image_dir`` was built
#: makes it build sources, rootfs and squashfs again (minutes on 2 cores).
BUILD_TIMEOUT = 900.0
LINK_TIMEOUT = 300.0
LABEL = ("rack", "r19")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """The fleet's REST API as its first admin (bearer token, the fleet's CA)."""

    def __init__(self, fleet: FleetProcess) -> None:
        self.base = fleet.url
        self.token = (fleet.data_dir / "admin-token").read_text().strip()
        self.context = ssl.create_default_context(cafile=str(fleet.data_dir / "ca.crt"))
        # The fleet's CA is the only trust root, as for basaltctl (which does the same).
        self.context.check_hostname = False

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, out: Path | None = None
    ) -> Answer:
        """One request; with ``out``, a 200's body is streamed into that file instead."""
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=120, context=self.context) as answer:
                got = {k.lower(): v for k, v in answer.headers.items()}
                if out is not None and answer.status == 200:
                    with out.open("wb") as stream:
                        while block := answer.read(1 << 20):
                            stream.write(block)
                    return Answer(answer.status, got, b"")
                return Answer(answer.status, got, answer.read())
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _seed(cache: Path, state: Path) -> int:
    """Hard-link the complete schematic-independent stages of ``cache`` into the factory
    state's cache; how many."""
    (state / "cache").mkdir(parents=True)
    seeded = 0
    for directory in sorted(cache.iterdir()):
        name = directory.name.rsplit("-", 1)[0]
        if name in SHARED and (directory / ".complete").exists():
            subprocess.run(["cp", "-al", str(directory), str(state / "cache")], check=True)
            seeded += 1
    return seeded


def _build(client: Client, build: str) -> dict[str, Any]:
    """Poll the build's status until it is done; fail with its error when it failed."""
    deadline = time.monotonic() + BUILD_TIMEOUT
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        answer = client.call("GET", build)
        assert answer.status == 200, answer.body[:500]
        report = answer.json()
        assert report["state"] != "failed", f"the factory's build failed:\n{report['error']}"
        if report["state"] == "done":
            return report
        time.sleep(2)
    raise AssertionError(f"the build was not done after {BUILD_TIMEOUT:.0f} s: {report}")


def _wait_link(fleet: FleetProcess, vm: Vm) -> dict[str, Any]:
    deadline = time.monotonic() + LINK_TIMEOUT
    while time.monotonic() < deadline:
        rows = [r for r in fleet.machines() if r["connected"]]
        if rows:
            return rows[0]
        assert vm.process.poll() is None, f"QEMU exited:\n{vm.console_tail()}"
        time.sleep(2)
    raise AssertionError(
        f"no link after {LINK_TIMEOUT:.0f} s:\n{vm.console_tail()}\n{fleet.log.read_text()[-3000:]}"
    )


def test_a_machine_booted_from_a_join_tokens_image_enrols_with_no_typing(
    image_dir: Path, tmp_path: Path, timings: Timings
) -> None:
    # image_dir: the stages of _out/cache are those of the current sources.
    state = tmp_path / "factory"
    assert _seed(REPO / "_out" / "cache", state) >= len(SHARED), "nothing to seed from"
    port = free_port()
    fleet = FleetProcess(
        tmp_path / "fleet",
        "127.0.0.1",
        port,
        tmp_path / "fleet.log",
        ("--advertise", "10.0.2.2", "--factory-state", str(state)),
    )
    fleet.start()
    vm: Vm | None = None
    try:
        fleet.login()
        client = Client(fleet)
        made = client.call("POST", "/v1/join-tokens", {"uses": 1, "labels": dict([LABEL])})
        assert made.status == 201, made.body
        token_id, secret, url = (made.json()[k] for k in ("id", "token", "url"))
        assert url.startswith(f"https://10.0.2.2:{port}/?token=")
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["token"] == [secret]

        started = time.monotonic()
        asked = client.call("POST", f"/v1/join-tokens/{token_id}/image", {"token": secret})
        assert asked.status == 202, asked.body
        image = asked.json()
        schematic = image["schematic"]
        assert image["token_id"] == token_id and secret not in asked.body.decode()
        report = _build(client, image["build"])
        timings.record("fleet factory: join-token image build (seeded cache)", report["seconds"])
        timings.record("fleet factory: image request -> build done", time.monotonic() - started)
        results = {step["stage"]: step["result"] for step in report["stages"]}
        print(f"\nfactory stages: {results}")
        assert results["boot"] == results["disk"] == "built"

        disk = tmp_path / "install.qcow2"
        got = client.call("GET", image["artefacts"]["disk.qcow2"], out=disk)
        assert got.status == 200, got.body[:500]
        digest = _sha256(disk)
        assert got.headers["etag"] == f'"{digest}"' and got.headers["x-content-sha256"] == digest

        overlay = tmp_path / "node.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "qcow2",
             str(overlay)],
            check=True,
        )  # fmt: skip
        argv = uefi_disk_command(overlay, 0)
        netdev = argv.index("-netdev") + 1
        argv[netdev] = "user,id=n0"  # no hostfwd: the host cannot dial the guest
        assert "hostfwd" not in " ".join(argv) and "basalt.fleet" not in " ".join(argv)
        console = tmp_path / "console.log"
        vm = Vm(argv, console, 0, *_launch(argv, console))
        machine = _wait_link(fleet, vm)
        timings.record("uefi installation image behind NAT: QEMU start -> fleet link up",
                       vm.elapsed())  # fmt: skip

        inventory = machine["inventory"]
        assert isinstance(inventory, dict)
        assert inventory["schematic"] == schematic, inventory
        assert inventory["stage"] == "maintenance" and not inventory.get("configured")
        assert machine["labels"].get(LABEL[0]) == LABEL[1], machine
        assert "enrolled with the fleet" in vm.console_text()
        tokens = client.call("GET", "/v1/join-tokens").json()
        assert [t["used"] for t in tokens if t["id"] == token_id] == [1]

        # The token is redacted wherever the fleet shows the schematic.
        listing = client.call("GET", "/factory/schematics")
        assert listing.status == 200 and schematic in listing.body.decode()
        index = client.call("GET", "/factory/")
        assert index.status == 200 and schematic in index.body.decode()
        for shown in (listing.body.decode(), index.body.decode()):
            assert secret not in shown
            assert "token=***" in shown
        assert secret not in fleet.log.read_text(errors="replace")
        entries = client.call("GET", "/v1/audit?limit=10000").json()
        requests = [e for e in entries if e["action"] == "join-token.image"]
        assert [(e["target"], e["detail"]["schematic"]) for e in requests] == [
            (token_id, schematic)
        ], requests
        assert secret not in json.dumps(entries)
    finally:
        if vm is not None:
            vm.stop()
        fleet.stop()
