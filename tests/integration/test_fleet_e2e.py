"""Basalt Fleet end to end: real machined processes enrol over their outbound links,
a template becomes a 3 + 1 cluster with real etcd, scales, drifts, is exported and
managed without the fleet; the fleet restarts mid-operation; the audit chain holds.

One module-scoped fleet and five machines (127.0.0.131-135; the fleet on .130); the
tests run in order and build on each other, as an operator's day would.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from basalt.machinery.api import resource_pb2
from basalt.machinery.client.client import Client
from basalt.machinery.client.config import load_client_config
from basalt.provision.process import create_machines, destroy
from basalt.provision.state import ClusterRecord
from tests.fakes.fleet import FleetProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEMPLATE = """\
apiVersion: fleet.basalt.dev/v1alpha1
kind: Cluster
name: e2e
versionContract: "0.1"
controlPlane:
  count: 3
workers:
  - name: default
    count: {workers}
    patches:
      - {{kind: SysctlConfig, sysctls: {{vm.max_map_count: "262144"}}}}
"""


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FleetProcess, ClusterRecord, Path]]:
    root = tmp_path_factory.mktemp("fleet-e2e")
    fleet = FleetProcess(root / "fleet", "127.0.0.130", 18600, root / "fleet.log")
    fleet.start()
    fleet.login()
    url = fleet.ctl("fleet", "token", "create", "--uses", "5", "--ttl", "1h").stdout.strip()
    record = asyncio.run(
        create_machines(
            "pool", 5, root / "pool", lambda *_: None,
            base_address="127.0.0.131", machined_args=("--fleet", url),
        )
    )  # fmt: skip
    try:
        yield fleet, record, root
    finally:
        fleet.stop()
        asyncio.run(destroy(record))


def template(root: Path, workers: int) -> Path:
    path = root / f"cluster-{workers}.yaml"
    path.write_text(TEMPLATE.format(workers=workers))
    return path


def running_config(basaltconfig: Path, address: str) -> str:
    config = load_client_config(basaltconfig)
    _, context = config.current()

    async def read() -> str:
        client = await Client.connect(address, ca=context.ca, crt=context.crt, key=context.key)
        try:
            answer = await client.resources.Get(
                resource_pb2.ResourceGetRequest(type="MachineConfigs", id="v1alpha1"), timeout=10
            )
        finally:
            await client.close()
        return str(json.loads(answer.messages[0].resource.spec_json)["yaml"])

    return asyncio.run(read())


def test_five_machines_enrol_with_one_token(
    world: tuple[FleetProcess, ClusterRecord, Path],
) -> None:
    fleet, record, _ = world
    rows = fleet.wait_machines(5, connected=True)
    assert {r["inventory"]["api_address"] for r in rows} == {n.address for n in record.nodes}
    assert all(r["state"] == "free" and r["inventory"]["stage"] == "maintenance" for r in rows)
    tokens = fleet.ctl("fleet", "token", "list").stdout
    assert " 5 " in tokens  # 5 of 5 used
    # Through the link, the fleet reaches each machine's own (maintenance) API.
    answer = fleet.ctl("fleet", "version", rows[0]["uuid"]).stdout
    assert "maintenance" in answer


def test_a_bad_template_is_refused_and_changes_nothing(
    world: tuple[FleetProcess, ClusterRecord, Path],
) -> None:
    fleet, _, root = world
    bad = root / "bad.yaml"
    bad.write_text(TEMPLATE.format(workers=1).replace("count: 3", "count: many"))
    result = fleet.ctl("fleet", "apply", "-f", str(bad), check=False)
    assert result.returncode != 0
    assert "Cluster.controlPlane.count" in result.stderr
    too_many = root / "too-many.yaml"
    too_many.write_text(TEMPLATE.format(workers=3))
    result = fleet.ctl("fleet", "apply", "-f", str(too_many), check=False)
    assert result.returncode != 0
    assert "workers[0].machineSelector" in result.stderr and "nothing was changed" in result.stderr
    broken_patch = root / "broken-patch.yaml"
    broken_patch.write_text(
        TEMPLATE.format(workers=1).replace('vm.max_map_count: "262144"', "bad key: 1")
    )
    result = fleet.ctl("fleet", "apply", "-f", str(broken_patch), check=False)
    assert result.returncode != 0 and "SysctlConfig" in result.stderr
    assert "workers[0].patches[0]" in result.stderr
    assert fleet.ctl("fleet", "clusters").stdout.count("\n") <= 1  # only the header
    assert all(m["state"] == "free" for m in fleet.machines())


def test_apply_a_template_three_controlplanes_and_a_worker(
    world: tuple[FleetProcess, ClusterRecord, Path],
) -> None:
    fleet, _, root = world
    plan = fleet.ctl("fleet", "apply", "-f", str(template(root, 1)), "--dry-run").stdout
    assert plan.count("allocate") == 4
    assert all(m["state"] == "free" for m in fleet.machines())  # a dry run changes nothing
    started = time.monotonic()
    fleet.ctl("fleet", "apply", "-f", str(template(root, 1)), "--timeout", "300")
    print(f"cluster of 3 + 1 applied in {time.monotonic() - started:.1f}s")
    machines = fleet.machines()
    assert sorted(m["state"] for m in machines) == ["allocated"] * 4 + ["free"]
    status = fleet.ctl("fleet", "status", "e2e").stdout
    assert "ready" in status and status.count("controlplane") == 3


def test_scale_workers_up_and_down(world: tuple[FleetProcess, ClusterRecord, Path]) -> None:
    fleet, _, root = world
    fleet.ctl("fleet", "apply", "-f", str(template(root, 2)), "--timeout", "300")
    assert sorted(m["state"] for m in fleet.machines()) == ["allocated"] * 5
    fleet.ctl("fleet", "apply", "-f", str(template(root, 1)), "--timeout", "300")
    machines = fleet.wait_machines(1, state="free", connected=True)
    assert machines[0]["inventory"]["stage"] == "maintenance"


def test_drift_behind_the_fleets_back_is_named_then_corrected(
    world: tuple[FleetProcess, ClusterRecord, Path],
) -> None:
    fleet, _, root = world
    assert fleet.ctl("fleet", "diff", "e2e", check=False).returncode == 0
    basaltconfig = root / "admin.basaltconfig"
    fleet.ctl("fleet", "basaltconfig", "e2e", "-o", str(basaltconfig))
    worker = next(m for m in fleet.machines() if m["role"] == "worker")
    address = worker["inventory"]["api_address"]
    fleet.ctl(
        "--basaltconfig", str(basaltconfig), "patch", "machineconfig", "-n", address,
        "-p", '{kind: SysctlConfig, sysctls: {net.core.somaxconn: "1024"}}',
    )  # fmt: skip
    diff = fleet.ctl("fleet", "diff", "e2e", check=False)
    assert diff.returncode == 2
    assert f'e2e/{worker["hostname"]}: SysctlConfig.sysctls["net.core.somaxconn"]' in diff.stdout
    assert "1024" not in diff.stdout  # paths, never values
    fleet.ctl("fleet", "apply", "-f", str(template(root, 1)), "--timeout", "300")
    assert fleet.ctl("fleet", "diff", "e2e", check=False).returncode == 0


def _fleetlock(fleet: FleetProcess, path: str, node: str) -> tuple[int, dict[str, Any]]:
    import ssl
    import urllib.error
    import urllib.request

    from basalt.machinery.client.config import load_client_config

    login = load_client_config(fleet.client_config).fleet
    assert login is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=login.ca)
    request = urllib.request.Request(
        f"{login.url}{path}",
        data=json.dumps({"client_params": {"id": node, "group": "default"}}).encode(),
        headers={
            "Authorization": f"Bearer {login.token}",
            "Content-Type": "application/json",
            "fleet-lock-protocol": "true",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_fleetlock_lets_one_control_plane_of_a_cluster_reboot_at_a_time(
    world: tuple[FleetProcess, ClusterRecord, Path],
) -> None:
    fleet, _, _ = world
    first, second = [m["uuid"] for m in fleet.machines() if m["role"] == "controlplane"][:2]
    code, body = _fleetlock(fleet, "/v1/pre-reboot", first)
    assert code == 200 and body["group"] == "e2e-controlplanes"  # whatever group it asked
    code, body = _fleetlock(fleet, "/v1/pre-reboot", second)
    assert code == 409 and body["kind"] == "failed_lock" and first in body["value"]
    assert _fleetlock(fleet, "/v1/steady-state", first)[0] == 200
    assert _fleetlock(fleet, "/v1/pre-reboot", second)[0] == 200  # its peers are ready
    assert _fleetlock(fleet, "/v1/steady-state", second)[0] == 200


def test_fleet_restarted_mid_operation_finishes_it(
    world: tuple[FleetProcess, ClusterRecord, Path],
) -> None:
    fleet, _, root = world
    fleet.ctl("fleet", "apply", "-f", str(template(root, 2)), "--no-wait")
    fleet.stop(signal.SIGKILL)  # mid-way: the operation was only started
    started = time.monotonic()
    fleet.start()
    fleet.wait_machines(5, connected=True, timeout=30)
    print(f"5 machines linked again {time.monotonic() - started:.1f}s after the restart")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = fleet.ctl("fleet", "status", "e2e").stdout
        if status.startswith("cluster e2e: ready"):
            break
        assert "failed" not in status.splitlines()[0], status
        time.sleep(1)
    assert sorted(m["state"] for m in fleet.machines()) == ["allocated"] * 5
    fleet.ctl("fleet", "apply", "-f", str(template(root, 1)), "--timeout", "300")


def test_export_regenerates_byte_identical_configs_and_works_without_the_fleet(
    world: tuple[FleetProcess, ClusterRecord, Path],
) -> None:
    import os
    import subprocess
    import sys

    fleet, _, root = world
    out = root / "export"
    fleet.ctl("fleet", "export", "e2e", "-o", str(out))
    assert "PRIVATE KEY" in (out / "secrets.yaml").read_text()
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        ["sh", str(out / "regenerate.sh")],
        check=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True,
    )
    nodes = [line.split("\t") for line in (out / "nodes.txt").read_text().splitlines()]
    assert len(nodes) == 4
    fleet.stop()
    try:
        for hostname, _uuid, _role, address, _digest in nodes:
            regenerated = (out / "configs" / f"{hostname}.yaml").read_text()
            assert running_config(out / "basaltconfig", address) == regenerated, hostname
        # The cluster is managed with plain basaltctl and the exported basaltconfig.
        addresses = ",".join(n[3] for n in nodes)
        version = fleet.ctl("--basaltconfig", str(out / "basaltconfig"), "version", "-n", addresses)
        assert version.stdout.count("0.1.0") >= 4
        members = fleet.ctl("--basaltconfig", str(out / "basaltconfig"), "etcd", "members")
        assert members.stdout.count("pool-machine-") == 3  # three etcd members
    finally:
        fleet.start()
        fleet.wait_machines(5, connected=True, timeout=30)


def _etcd(root: Path, address: str) -> Any:
    import yaml

    from basalt.machined.etcd.client import EtcdClient, client_url
    from basalt.machinery.pki import CertificateAndKey, issue_certificate

    secrets = yaml.safe_load((root / "export" / "secrets.yaml").read_text())
    ca = CertificateAndKey(secrets["certs"]["etcd"]["crt"], secrets["certs"]["etcd"]["key"])
    return EtcdClient(client_url(address), ca.crt, issue_certificate(ca, "test", client=True))


def test_backup_and_restore_recover_etcd(world: tuple[FleetProcess, ClusterRecord, Path]) -> None:
    fleet, _, root = world
    controlplane = next(m for m in fleet.machines() if m["role"] == "controlplane")
    address = controlplane["inventory"]["api_address"]

    async def put(key: bytes) -> None:
        async with _etcd(root, address) as client:
            await client.put(key, b"x")

    async def get(key: bytes) -> bytes | None:
        deadline = time.monotonic() + 60
        while True:
            try:
                async with _etcd(root, address) as client:
                    value: bytes | None = await client.get(key)
                    return value
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    asyncio.run(put(b"/fleet-test/before"))
    taken = fleet.ctl("fleet", "backup", "e2e").stdout.split("\t")[0]
    assert taken in fleet.ctl("fleet", "backups", "e2e").stdout
    asyncio.run(put(b"/fleet-test/after"))
    started = time.monotonic()
    fleet.ctl("fleet", "restore", "e2e", "--snapshot", taken, "--timeout", "300")
    print(f"etcd restored from {taken} in {time.monotonic() - started:.1f}s")
    assert asyncio.run(get(b"/fleet-test/before")) == b"x"
    assert asyncio.run(get(b"/fleet-test/after")) is None
    members = fleet.ctl("--basaltconfig", str(root / "export" / "basaltconfig"), "etcd", "members")
    assert members.stdout.count("pool-machine-") == 3
    missing = fleet.ctl("fleet", "restore", "e2e", "--snapshot", "nope", check=False)
    assert missing.returncode == 1 and "no snapshot 'nope'" in missing.stderr


def test_kubeconfig_then_delete_frees_every_machine(
    world: tuple[FleetProcess, ClusterRecord, Path],
) -> None:
    fleet, _, _ = world
    kubeconfig = fleet.ctl("fleet", "kubeconfig", "e2e").stdout
    assert "clusters:" in kubeconfig and "client-key-data" in kubeconfig
    started = time.monotonic()
    fleet.ctl("fleet", "delete", "e2e", "--timeout", "300")
    print(f"cluster deleted, its 4 machines reset and free in {time.monotonic() - started:.1f}s")
    machines = fleet.wait_machines(5, state="free", connected=True, timeout=60)
    assert all(m["inventory"]["stage"] == "maintenance" for m in machines)
    assert fleet.ctl("fleet", "clusters").stdout.count("\n") <= 1


def test_audit_chain_verifies_and_a_hand_edit_breaks_it(
    world: tuple[FleetProcess, ClusterRecord, Path],
) -> None:
    fleet, _, _ = world
    assert "intact" in fleet.ctl("fleet", "audit", "--verify").stdout
    log = fleet.ctl("fleet", "audit", "--limit", "1000").stdout
    for action in (
        "machine.enrol",
        "cluster.apply",
        "secret.read.basaltconfig",
        "secret.read.export",
    ):
        assert action in log, action
    with sqlite3.connect(fleet.data_dir / "fleet.db") as db:
        db.execute("UPDATE audit SET actor = 'someone-else' WHERE action = 'cluster.apply'")
    broken = fleet.ctl("fleet", "audit", "--verify", check=False)
    assert broken.returncode == 1 and "edited" in broken.stdout


def test_a_removed_machine_cannot_link_again(
    world: tuple[FleetProcess, ClusterRecord, Path],
) -> None:
    fleet, _, _ = world
    free = fleet.wait_machines(1, state="free", connected=True)[0]
    fleet.ctl("fleet", "remove", free["uuid"])
    time.sleep(3)  # the machine retries; the fleet refuses its certificate
    row = next(m for m in fleet.machines() if m["uuid"] == free["uuid"])
    assert row["state"] == "removed" and not row["connected"]
    assert "was removed" in fleet.log.read_text()
