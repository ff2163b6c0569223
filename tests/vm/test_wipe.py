"""``wipe disk`` and ``meta`` on an installed metal node in QEMU (TCG, q35, OVMF).

One node serves the module: booted from an overlay of the image's disk with a second,
raw 64 MiB disk (``/dev/vdb``) whose first, middle and last MiB hold marker bytes; the
config installs to ``/dev/vda`` and the node reboots into the installed system (QEMU
exits on the guest's reboot; the test boots the same disks again). Then, through the
installed basaltctl and mTLS:

- the system disk and its partitions are refused with the reason, and nothing changes;
- an unknown device is NOT_FOUND and the node's disks are listed;
- ``--method fast`` zeroes the first and last MiB of vdb (read back from the raw file on
  the host) and leaves the middle, ``--method zeroes`` zeroes all of it;
- META keys are written, read back, refused when Basalt owns the name, and deleted, on
  the real META partition, and survive next to the boot state.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vm.conftest import Timings
from tests.vm.machine import Vm, call
from tests.vm.test_install import BOOT_TIMEOUT, INSTALL_TIMEOUT, _apply, _overlay
from tests.vm.test_metal_node import BASALTCTL, GUEST_ADDRESS, _ctl, _empty

pytestmark = pytest.mark.vm

MIB = 1 << 20
BLANK_SIZE = 64 * MIB
MARK = b"basalt-wipe-marker!"


def _marked_disk(path: Path) -> Path:
    """A raw disk with MARK repeated over its first, middle and last MiB."""
    fill = (MARK * (MIB // len(MARK) + 1))[:MIB]
    with path.open("wb") as disk:
        disk.truncate(BLANK_SIZE)
        for offset in (0, BLANK_SIZE // 2, BLANK_SIZE - MIB):
            disk.seek(offset)
            disk.write(fill)
    return path


def _region(path: Path, offset: int) -> bytes:
    with path.open("rb") as disk:
        disk.seek(offset)
        return disk.read(MIB)


@dataclass
class Node:
    vm: Vm
    basaltconfig: Path
    blank: Path

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "BASALTCONFIG": str(self.basaltconfig)}
        return subprocess.run(
            [*BASALTCTL, *args, "-e", self.vm.endpoint],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def ok(self, *args: str) -> str:
        done = self.ctl(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    def refused(self, *args: str) -> str:
        done = self.ctl(*args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        return done.stderr


@pytest.fixture(scope="module")
def node(
    image_dir: Path, tmp_path_factory: pytest.TempPathFactory, timings: Timings
) -> Iterator[Node]:
    from basalt.machinery.client.config import load_client_config

    work = tmp_path_factory.mktemp("wipe")
    disk = _overlay(image_dir, work / "node.qcow2")
    blank = _marked_disk(work / "blank.raw")
    second = (
        *("-drive", f"file={blank},format=raw,if=none,id=d1"),
        *("-device", "virtio-blk-pci,drive=d1"),
    )
    out = work / "config"
    _ctl(
        *("gen", "config", "vm", f"https://{GUEST_ADDRESS}:6443", "-o", str(out)),
        *("--install-disk", "/dev/vda", "--additional-sans", "127.0.0.1"),
    )
    _, context = load_client_config(out / "basaltconfig").current()
    vm = Vm.boot_disk(disk, work, name="console-1", extra_args=second)
    try:
        vm.wait(lambda: call(vm.endpoint, "Version", _empty(), timeout=5), BOOT_TIMEOUT, "maint")
        applied = _apply(vm.endpoint, out / "controlplane.yaml")
        assert applied.returncode == 0, applied.stdout + applied.stderr + vm.console_tail()
        assert vm.process.wait(timeout=INSTALL_TIMEOUT) == 0, vm.console_tail()
        vm = Vm.boot_disk(disk, work, port=vm.port, name="console-2", extra_args=second)
        vm.wait(
            lambda: call(vm.endpoint, "Version", _empty(), context=context, timeout=5),
            BOOT_TIMEOUT,
            "mTLS API after install",
        )
        timings.record("uefi (wipe): QEMU start -> installed node answers", vm.mark("mtls"))
        yield Node(vm, out / "basaltconfig", blank)
    finally:
        vm.stop()


def test_the_system_disk_is_refused_with_its_reason(node: Node) -> None:
    err = node.refused("wipe", "disk", "/dev/vda", "--yes")
    assert "FAILED_PRECONDITION" in err
    assert "is the system disk: it holds the booted slot BASALT-A (vda2)" in err
    assert "vda6 is mounted on /var" in err
    err = node.refused("wipe", "disk", "vda4", "--yes")  # META, not mounted
    assert "a partition of vda, which is the system disk" in err
    assert _region(node.blank, 0).startswith(MARK)  # and vdb untouched by all that


def test_an_unknown_device_is_not_found_with_the_disks_listed(node: Node) -> None:
    err = node.refused("wipe", "disk", "sdz", "--yes")
    assert "NOT_FOUND" in err
    assert "no block device 'sdz' on this node (disks: vda (4.0 GiB), vdb (64.0 MiB))" in err


def test_fast_then_zeroes_wipe_the_blank_disk(node: Node) -> None:
    out = node.ok("wipe", "disk", "vdb", "--yes")
    assert "/dev/vdb wiped (fast: first and last MiB zeroed" in out
    assert _region(node.blank, 0) == bytes(MIB)
    assert _region(node.blank, BLANK_SIZE - MIB) == bytes(MIB)
    assert _region(node.blank, BLANK_SIZE // 2).startswith(MARK)  # fast leaves the middle
    out = node.ok("wipe", "disk", "/dev/vdb", "--method", "zeroes", "--yes")
    assert "/dev/vdb wiped (zeroes: zeroed whole" in out
    assert _region(node.blank, BLANK_SIZE // 2) == bytes(MIB)
    logs = node.ok("logs", "machined")
    assert "wiping /dev/vdb: 100% (64 of 64 MiB)" in logs


def test_meta_keys_on_the_real_meta_partition(node: Node) -> None:
    node.ok("meta", "write", "site.rack", "r12")
    node.ok("meta", "write", "owner-team", "storage")
    assert node.ok("meta", "read", "site.rack").strip() == "r12"
    listing = node.ok("meta", "read")
    assert "site.rack" in listing and "owner-team" in listing and "storage" in listing
    err = node.refused("meta", "write", "basalt.slot", "B")
    assert "INVALID_ARGUMENT" in err and "reserved by Basalt" in err
    node.ok("meta", "delete", "owner-team")
    err = node.refused("meta", "read", "owner-team")
    assert "NOT_FOUND" in err and "META has no key 'owner-team'" in err
    # The boot state META also holds is still read as before.
    assert "slot" in node.ok("get", "bootstatus").lower()
