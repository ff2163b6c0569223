"""The image itself: no shell in the root, and it boots on q35 (virtio-pci) as well as on
microvm (virtio-mmio, which test_metal_node.py boots and drives)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.vm.conftest import Timings
from tests.vm.machine import Vm, call

pytestmark = pytest.mark.vm


@pytest.mark.slow
def test_q35_boots_into_maintenance_mode(image_dir: Path, tmp_path: Path, timings: Timings) -> None:
    from basalt.machinery.api import common_pb2

    machine = Vm.boot(image_dir, tmp_path, machine="q35")
    try:
        answer = machine.wait(
            lambda: call(machine.endpoint, "Version", common_pb2.Empty(), timeout=5),
            120.0,
            "maintenance API",
        )
        timings.record("q35: QEMU start -> maintenance API answer", machine.elapsed())
    finally:
        machine.stop()
        timings.timelines["q35 maintenance boot"] = machine.timeline()
    (info,) = answer.messages
    assert (info.mode, info.platform) == ("maintenance", "metal")


def test_root_has_no_shell(image_dir: Path) -> None:
    listing = subprocess.run(
        ["unsquashfs", "-l", "-d", "", str(image_dir / "root.sqfs")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    paths = {line.strip() for line in listing.splitlines() if line.strip()}
    assert {"/usr/bin/python3.11", "/usr/sbin/init", "/bin"} <= paths
    # /bin, /sbin are symlinks into /usr: a shell would be listed under /usr.
    for name in ("sh", "bash", "dash", "busybox", "ls", "mount", "apt", "dpkg", "pip"):
        for directory in ("/usr/bin", "/usr/sbin", "/bin", "/sbin"):
            assert f"{directory}/{name}" not in paths
    from basalt.imager import pipeline
    from basalt.machinery.image_layout import IMAGE_MODULES, IMAGE_MOUNT_POINTS

    for point in (*IMAGE_MOUNT_POINTS, IMAGE_MODULES):
        assert f"/{point}" in paths, point
    manifest = pipeline.inspect(image_dir)
    assert manifest["executables"] == [
        "/usr/bin/containerd",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/bin/etcd",
        "/usr/bin/python3.11",
        "/usr/sbin/init",
        "/usr/sbin/mke2fs",
        "/usr/sbin/runc",
    ]
