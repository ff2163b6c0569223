"""A one-control-plane cluster of VMs through ``basaltctl cluster create --provisioner qemu``:
booted from the image, configured through the maintenance API, answering over mTLS."""

from __future__ import annotations

import os
import subprocess
import sys
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
        cmdline = Path(f"/proc/{node.launcher_pid}/cmdline").read_bytes().split(b"\0")
        assert Path(cmdline[0].decode()).name.startswith("qemu-system")
    finally:
        if (state / "cluster.json").exists():
            from basalt.provision.state import ClusterRecord

            pids = [n.launcher_pid for n in ClusterRecord.load(state).nodes]
            basaltctl(env, config, "cluster", "destroy", "--name", "vmtest")
            for pid in pids:
                cmdline = Path(f"/proc/{pid}/cmdline")
                assert not cmdline.exists() or not cmdline.read_bytes(), "QEMU still runs"
    assert not state.exists()
