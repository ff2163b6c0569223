"""``basaltctl rotate-ca`` on a process cluster of 3 control planes and 1 worker.

Real machined processes, real mTLS. The rotation is interrupted after each step and in
the middle of the issue step (``--stop-after``, a hidden option for tests), and run again
each time; after every stop, the old client config and the rotated one both reach every
node, until the old CA is dropped: then only the rotated one does. One cluster serves
every case, in file order.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from basalt.cli.main import main
from basalt.machinery.api import common_pb2
from basalt.machinery.client.client import Client
from basalt.machinery.client.config import (
    ClientConfig,
    Context,
    issue_client_context,
    load_client_config,
    save_client_config,
)
from basalt.machinery.config import load_bundle
from basalt.machinery.pki import verify_issued_by
from basalt.machinery.roles import Role
from tests.fakes.cluster import LiveCluster, run, start_cluster, stop_cluster

pytestmark = pytest.mark.integration

BASE = "127.0.9.21"
_SCRIPT = Path(sys.executable).with_name("basaltctl")
BASALTCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "basalt.cli.main"]


@dataclass
class Setup:
    cluster: LiveCluster
    root: Path
    config: Path  # the client config rotate-ca updates
    secrets: Path
    old: Context  # a copy of the client config from before the rotation
    old_ca: str

    @property
    def nodes(self) -> list[str]:
        return self.cluster.controlplanes + self.cluster.workers

    @property
    def state(self) -> Path:
        return self.secrets.with_name("rotate-ca.state.json")

    def ctl(self, *args: str, config: Path | None = None) -> int:
        return main(["--basaltconfig", str(config or self.config), *args])

    def rotate(self, *args: str) -> int:
        return self.ctl("rotate-ca", "--secrets", str(self.secrets), *args)

    def current(self) -> Context:
        return load_client_config(self.config).current()[1]

    def configs(self) -> dict[str, dict[str, object]]:
        """Each node's MachineConfig document, as the node reports it."""

        async def read() -> dict[str, dict[str, object]]:
            from basalt.cli._api import NodeFailures
            from basalt.cli.edit import current_config

            client = await _client(self.current(), self.cluster.controlplanes[0])
            try:
                found = {}
                for node in self.nodes:
                    text = await current_config(client, NodeFailures(), node)
                    assert text is not None, node
                    found[node] = load_bundle(text).machine.model_dump(by_alias=True)
                return found
            finally:
                await client.close()

        return run(read())


async def _client(context: Context, endpoint: str, ca: str | None = None) -> Client:
    return await Client.connect(endpoint, ca=ca or context.ca, crt=context.crt, key=context.key)


def reaches(context: Context, address: str, ca: str | None = None) -> bool:
    """Whether ``context`` gets a Version answer from ``address``, dialled directly."""

    async def call() -> bool:
        client = await _client(context, address, ca)
        try:
            await client.machine.Version(common_pb2.Empty(), timeout=10)
        except grpc.aio.AioRpcError:
            return False
        finally:
            await client.close()
        return True

    return run(call())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("rotate-ca")
    cluster = start_cluster(root, "rotca", BASE, controlplanes=3, workers=1)
    try:
        for address in cluster.controlplanes + cluster.workers:
            run(cluster.wait_ready(address, timeout=120))
        config = root / "basaltconfig"
        context = Context(
            ca=cluster.context.ca,
            crt=cluster.context.crt,
            key=cluster.context.key,
            endpoints=[cluster.controlplanes[0]],
        )
        save_client_config(ClientConfig(context="rotca", contexts={"rotca": context}), config)
        secrets = root / "secrets" / "secrets.yaml"
        secrets.parent.mkdir()
        shutil.copy(Path(cluster.record.state_dir) / "secrets.yaml", secrets)
        old = Context(context.ca, context.crt, context.key, list(context.endpoints))
        yield Setup(cluster, root, config, secrets, old, cluster.os_ca.crt)
    finally:
        stop_cluster(cluster)


def lost(setup: Setup) -> list[str]:
    """Who cannot call Version where: the untouched old client config and the current
    one, on every node (empty: access is intact)."""

    async def probe() -> list[str]:
        failed = []
        current = setup.current()
        for node in setup.nodes:
            for name, context in (("old", setup.old), ("current", current)):
                client = await _client(context, node)
                try:
                    await client.machine.Version(common_pb2.Empty(), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    failed.append(f"{name} client on {node}: {exc.code().name}")
                finally:
                    await client.close()
        return failed

    return run(probe())


def assert_both_reach_every_node(setup: Setup) -> None:
    assert lost(setup) == []


def test_refusals_change_nothing(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    before = setup.configs()
    # A secrets bundle of another cluster.
    other = setup.root / "other" / "secrets.yaml"
    other.parent.mkdir()
    assert setup.ctl("gen", "secrets", "-o", str(other)) == 0
    capsys.readouterr()
    assert setup.ctl("rotate-ca", "--secrets", str(other)) == 1
    assert "does not match the cluster" in capsys.readouterr().err
    assert not other.with_name("rotate-ca.state.json").exists()
    # A client that is not an admin.
    reader_config = setup.root / "reader-config"
    reader = issue_client_context(
        setup.cluster.os_ca, endpoints=[setup.cluster.controlplanes[0]], roles=[Role.READER]
    )
    save_client_config(ClientConfig(context="r", contexts={"r": reader}), reader_config)
    assert setup.ctl("rotate-ca", "--secrets", str(setup.secrets), config=reader_config) == 1
    assert "needs an os:admin client certificate" in capsys.readouterr().err
    # A node that does not answer (named with -n: one down for longer than the member
    # list keeps it is no member, and must not be left behind).
    assert setup.rotate("-n", f"{setup.nodes[0]},127.0.9.99") == 1
    err = capsys.readouterr().err
    assert "127.0.9.99 did not answer" in err and "nothing was changed" in err
    # Another rotate-ca holding the lock.
    import fcntl

    with open(setup.state.with_name("rotate-ca.state.json.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert setup.rotate() == 1
        assert "another rotate-ca is running" in capsys.readouterr().err
    # The plan.
    assert setup.rotate("--dry-run") == 0
    plan = capsys.readouterr().out
    assert "a new CA, generated when run" in plan and "step trust" in plan
    assert all(node in plan for node in setup.nodes)
    assert setup.configs() == before
    assert not setup.state.exists()
    assert load_client_config(setup.config).current()[1].ca == setup.old.ca


def test_trust_step_then_stop(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert setup.rotate("--stop-after", "trust") == 0
    capsys.readouterr()
    assert setup.rotate("--dry-run") == 0  # the plan from here: the steps left
    plan = capsys.readouterr().out
    assert "step trust" not in plan and "step issue" in plan and "step drop" in plan
    assert plan.count(": trusting") == len(setup.nodes), plan
    state = yaml.safe_load(setup.state.read_text())
    assert stat.S_IMODE(setup.state.stat().st_mode) == 0o600
    new_ca = state["newCA"]["crt"]
    for node, machine in setup.configs().items():
        assert machine["ca"]["crt"].strip() == setup.old_ca.strip(), node  # type: ignore[index]
        assert [c.strip() for c in machine["acceptedCAs"]] == [new_ca.strip()], node  # type: ignore[attr-defined]
    assert new_ca.strip() in setup.current().ca  # the client trusts both now
    assert_both_reach_every_node(setup)


def test_issue_step_interrupted_mid_way_then_finished(setup: Setup) -> None:
    new_ca = yaml.safe_load(setup.state.read_text())["newCA"]["crt"]
    assert setup.rotate("--stop-after", "issue:1") == 0  # one control plane switched
    assert_both_reach_every_node(setup)
    # The rest of the step as a real basaltctl process, probed all the while: neither
    # the old client config nor the current one loses any node at any moment.
    environment = {**os.environ, "BASALTCONFIG": str(setup.config)}
    command = [*BASALTCTL, "rotate-ca", "--secrets", str(setup.secrets), "--stop-after", "issue"]
    process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE)
    rounds, failures = 0, []
    while process.poll() is None:
        failures += lost(setup)
        rounds += 1
    assert process.wait() == 0, process.stderr.read().decode() if process.stderr else ""
    assert failures == [] and rounds >= 2, (failures, rounds)
    assert_both_reach_every_node(setup)
    current = setup.current()
    assert verify_issued_by(current.crt, new_ca)  # a new client certificate, same roles
    for node in setup.nodes:  # every node serves a certificate of the new CA
        assert reaches(current, node, ca=new_ca), node
    worker = setup.cluster.workers[0]
    assert reaches(setup.old, worker, ca=new_ca)  # the old client certificate still works
    assert reaches(setup.old, worker)  # and the old config verifies the worker (cross-signed)
    secrets = yaml.safe_load(setup.secrets.read_text())
    assert secrets["certs"]["os"]["crt"].strip() == new_ca.strip()
    # Run again with the same stop: nothing left to do before it, nothing changes; and
    # with the state file lost, the secrets bundle (new CA since the issue step) and the
    # nodes' configs (the other CA) say which rotation this is.
    before = setup.configs()
    saved = setup.state.read_text()
    setup.state.unlink()
    assert setup.rotate("--stop-after", "issue") == 0
    assert setup.configs() == before
    recovered = yaml.safe_load(setup.state.read_text())
    assert recovered["newCA"] == yaml.safe_load(saved)["newCA"]
    assert recovered["oldCA"].strip() == setup.old_ca.strip()


def test_drop_step_interrupted_then_converges(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    new_ca = yaml.safe_load(setup.state.read_text())["newCA"]["crt"]
    assert setup.rotate("--stop-after", "drop:2") == 0  # two nodes dropped the old CA
    dropped = [n for n, m in setup.configs().items() if not m.get("acceptedCAs")]
    assert len(dropped) == 2
    for node in setup.nodes:
        assert reaches(setup.current(), node), node
        assert reaches(setup.old, node, ca=new_ca) == (node not in dropped), node
        assert reaches(setup.old, node) == (node not in dropped), node
    assert setup.rotate() == 0
    assert not setup.state.exists()
    current = setup.current()
    assert current.ca.strip() == new_ca.strip()
    for node, machine in setup.configs().items():
        assert machine["ca"]["crt"].strip() == new_ca.strip(), node  # type: ignore[index]
        assert not machine.get("acceptedCAs"), node
    for node in setup.nodes:
        assert reaches(current, node), node
        assert not reaches(setup.old, node), f"the old client still gets into {node}"
        assert not reaches(setup.old, node, ca=new_ca), f"old certificate accepted by {node}"
    # gen config from the updated secrets bundle yields the new CA.
    out = setup.root / "generated"
    args = ["gen", "config", "rotca", "https://127.0.9.21:6443", "--with-secrets"]
    assert setup.ctl(*args, str(setup.secrets), "--version-contract", "0.1", "-o", str(out)) == 0
    generated = load_bundle((out / "controlplane.yaml").read_text()).machine
    assert generated.ca.crt.strip() == new_ca.strip()
    # A finished rotation leaves no state: running again plans a new one.
    assert setup.rotate("--dry-run") == 0
    assert "a new CA, generated when run" in capsys.readouterr().out


def test_a_second_rotation_killed_again_and_again_converges(setup: Setup) -> None:
    """basaltctl killed (SIGKILL) at growing delays, wherever it is, then run to the end:
    the rotated client config reaches every node after every kill, and the cluster ends
    on one CA that every node, the client config and the secrets bundle agree on."""
    environment = {**os.environ, "BASALTCONFIG": str(setup.config)}
    command = [*BASALTCTL, "rotate-ca", "--secrets", str(setup.secrets)]
    first_ca = setup.current().ca
    kills = 0
    # Growing delays until a run gets to the end by itself: how many kills that takes
    # depends on the machine's speed, not on the test (each run resumes the last).
    for delay in (1.0 + 0.5 * i for i in range(16)):
        process = subprocess.Popen(command, env=environment, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            kills += 1
            assert lost_by_current(setup) == [], f"after a kill at {delay}s"
        else:
            break
    assert kills >= 2  # it was interrupted for real, more than once
    assert setup.rotate() == 0
    assert not setup.state.exists()
    final = setup.current().ca
    assert final.strip() != first_ca.strip()
    secrets = yaml.safe_load(setup.secrets.read_text())
    assert secrets["certs"]["os"]["crt"].strip() == final.strip()
    for node, machine in setup.configs().items():
        assert machine["ca"]["crt"].strip() == final.strip(), node  # type: ignore[index]
        assert not machine.get("acceptedCAs") and not machine.get("crossSignedCA"), node
    assert lost_by_current(setup) == []


def lost_by_current(setup: Setup) -> list[str]:
    return [f for f in lost(setup) if f.startswith("current")]
