"""A one-control-plane cluster of VMs through ``basaltctl cluster create --provisioner qemu``:
booted from the image, configured through the maintenance API, answering over mTLS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

BASE = "127.0.0.91"  # away from the process clusters' 127.0.0.11 and the integration tests


def basaltctl(env: dict[str, str], config: Path, *argv: str, timeout: float = 60) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "basalt.cli.main", "--basaltconfig", str(config), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"basaltctl {' '.join(argv)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def test_qemu_cluster_create_version_destroy(image_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "BASALT_CLUSTERS_DIR": str(tmp_path / "clusters")}
    config = tmp_path / "basaltconfig"
    state = tmp_path / "clusters" / "vmtest"
    try:
        created = basaltctl(
            env,
            config,
            "cluster",
            "create",
            "--provisioner",
            "qemu",
            "--name",
            "vmtest",
            "--controlplanes",
            "1",
            "--workers",
            "0",
            "--base-address",
            BASE,
            "--image",
            str(image_dir),
            timeout=600,
        )
        print(created)
        assert "cluster 'vmtest' is ready" in created

        version = basaltctl(env, config, "version")  # the new context: mTLS to 127.0.0.91
        assert "(normal mode)" in version
        assert "Type: controlplane" in version and "Hostname: vmtest-controlplane-1" in version

        shown = basaltctl(env, config, "cluster", "show", "--name", "vmtest")
        assert "(qemu)" in shown and "running" in shown
        from basalt.provision.state import ClusterRecord

        (node,) = ClusterRecord.load(state).nodes
        # The launcher is the runner that starts QEMU again on guest reboots; the node
        # installed to its disk and rebooted once on the way (the runner says so).
        cmdline = Path(f"/proc/{node.launcher_pid}/cmdline").read_bytes().split(b"\0")
        assert b"basalt.provision.qemu_runner" in cmdline
        qemu_pid = int((Path(node.node_dir) / "qemu.pid").read_text().split()[0])
        qemu_cmdline = Path(f"/proc/{qemu_pid}/cmdline").read_bytes().split(b"\0")
        assert Path(qemu_cmdline[0].decode()).name.startswith("qemu-system")
        console = (Path(node.node_dir) / "console.log").read_text(errors="replace")
        assert "installed to /dev/vda; rebooting" in console
        assert "the guest rebooted; starting QEMU again" in console
    finally:
        if (state / "cluster.json").exists():
            from basalt.provision.state import ClusterRecord

            pids = [n.launcher_pid for n in ClusterRecord.load(state).nodes]
            basaltctl(env, config, "cluster", "destroy", "--name", "vmtest")
            for pid in pids:
                cmdline = Path(f"/proc/{pid}/cmdline")
                assert not cmdline.exists() or not cmdline.read_bytes(), "QEMU still runs"
    assert not state.exists()


BRIDGE_BASE = "127.0.0.94"


@pytest.mark.skipif(os.geteuid() != 0, reason="the bridge network needs root")
def test_three_control_planes_on_the_bridge_form_one_etcd_cluster(
    image_dir: Path, tmp_path: Path
) -> None:
    """Root mode: the VMs share a bridge in the cluster's own namespace, so etcd peers see
    each other's real addresses and three control planes become three voting members."""
    from basalt.provision.qemu import cluster_bridge
    from basalt.provision.state import ClusterRecord

    env = {**os.environ, "BASALT_CLUSTERS_DIR": str(tmp_path / "clusters")}
    config = tmp_path / "basaltconfig"
    state = tmp_path / "clusters" / "trio"
    try:
        created = basaltctl(
            env,
            config,
            "cluster",
            "create",
            "--provisioner",
            "qemu",
            "--network",
            "bridge",
            "--name",
            "trio",
            "--controlplanes",
            "3",
            "--workers",
            "0",
            "--base-address",
            BRIDGE_BASE,
            "--image",
            str(image_dir),
            "--wait-timeout",
            "900",
            timeout=1500,
        )
        print(created)
        assert "cluster 'trio' is ready" in created and "network: bridge" in created
        assert cluster_bridge(state).exists()
        guests = [n.guest_address for n in ClusterRecord.load(state).nodes]
        import json

        def records(kind: str, nodes: list[str]) -> list[dict[str, object]]:
            out = basaltctl(env, config, "get", kind, "-o", "json", "-n", ",".join(nodes))
            return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

        # EtcdMembers is refreshed every few seconds (etcd.observe.INTERVAL): the last
        # member to join may still show as added but not started (no name yet) at first.
        deadline = time.monotonic() + 60
        members = [r["spec"] for r in records("etcdmembers", guests[:1])]
        while time.monotonic() < deadline and not all(m["name"] for m in members):  # type: ignore[index]
            time.sleep(2)
            members = [r["spec"] for r in records("etcdmembers", guests[:1])]
        print(members)
        assert sorted(m["name"] for m in members) == [  # type: ignore[index]
            "trio-controlplane-1",
            "trio-controlplane-2",
            "trio-controlplane-3",
        ]
        assert not any(m["isLearner"] for m in members)  # type: ignore[index]
        statuses = [r["spec"] for r in records("etcdstatuses", guests)]
        print(statuses)
        assert len(statuses) == 3
        leaders = {s["leader"] for s in statuses}  # type: ignore[index]
        assert len(leaders) == 1, f"the members disagree on the leader: {leaders}"
    finally:
        keep = Path(__file__).resolve().parents[2] / "_out" / "vm-logs" / "trio"
        shutil.rmtree(keep, ignore_errors=True)
        for log in state.glob("*/console.log"):  # kept for a post-mortem
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, keep / f"{log.parent.name}.log")
        if (state / "cluster.json").exists():
            basaltctl(env, config, "cluster", "destroy", "--name", "trio", timeout=120)
    assert not state.exists() and not cluster_bridge(state).exists()
