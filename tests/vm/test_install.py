"""Install to disk in QEMU (TCG, q35, OVMF, systemd-boot): the whole first-boot path.

The node boots the image's ``disk.raw`` through a 4 GiB qcow2 overlay (as the qemu
provisioner does) and comes up in maintenance mode. A config naming a disk the node
does not have is refused with an error naming ``MachineConfig.install.disk``, and the
disk stays untouched (the overlay holds no written cluster). The real config installs:
STATE and EPHEMERAL are added, the node reboots (``-no-reboot``: QEMU exits and the
test boots the same disk again), and answers with mTLS, with the config it got in
maintenance mode, ``/`` a read-only squashfs on BASALT-A, /var the EPHEMERAL ext4 and
/system/state the STATE ext4. A second reboot keeps all of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.vm.conftest import Timings
from tests.vm.machine import Vm, call
from tests.vm.test_metal_node import GUEST_ADDRESS, _ctl, _empty

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 240.0
INSTALL_TIMEOUT = 240.0
DISK_SIZE = "4G"
API = "basalt.dev/v1alpha1"
#: install.extraKernelArgs of the installed node: a real one and a marker.
EXTRA = ["printk.devkmsg=on", "basalt.test=installed"]


def _overlay(image_dir: Path, path: Path) -> Path:
    """A qcow2 backed by the image's disk.raw, grown to DISK_SIZE."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image_dir / "disk.raw"),
         "-F", "raw", str(path), DISK_SIZE],
        check=True,
    )  # fmt: skip
    return path


def _written_clusters(overlay: Path) -> list[dict[str, Any]]:
    """The overlay's own data: what the guest wrote (the backing file is depth 1)."""
    done = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(overlay)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [m for m in json.loads(done.stdout) if m["depth"] == 0 and m["data"]]


def _apply(endpoint: str, config: Path) -> subprocess.CompletedProcess[str]:
    from tests.vm.test_metal_node import BASALTCTL

    return subprocess.run(
        [*BASALTCTL, "apply-config", "--insecure", "-n", endpoint, "-f", str(config)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


@dataclass
class Installed:
    disk: Path
    workdir: Path
    basaltconfig: Path
    context: Any
    vm: Vm
    consoles: list[str] = field(default_factory=list)
    refused: subprocess.CompletedProcess[str] | None = None
    untouched: list[dict[str, Any]] = field(default_factory=list)
    applied: str = ""

    def call(self, method: str, request: Any = None) -> Any:
        return asyncio.run(
            call(self.vm.endpoint, method, request or _empty(), context=self.context)
        )

    def ctl(self, *args: str) -> str:
        return _ctl(*args, "-e", self.vm.endpoint, config=self.basaltconfig)

    def wait_mtls(self, what: str) -> Any:
        return self.vm.wait(
            lambda: call(self.vm.endpoint, "Version", _empty(), context=self.context, timeout=5),
            BOOT_TIMEOUT,
            what,
        )

    def reboot_from_disk(self, name: str) -> None:
        """The guest rebooted (QEMU exited): boot the same disk again, same port."""
        code = self.vm.process.wait(timeout=INSTALL_TIMEOUT)
        assert code == 0, self.vm.console_tail()
        self.consoles.append(self.vm.console_text())
        self.vm = Vm.boot_disk(self.disk, self.workdir, port=self.vm.port, name=name)


def boot_for_install(image_dir: Path, work: Path, *patches: dict[str, Any]) -> Installed:
    """A config for a control plane installing to /dev/vda (with ``patches``) in
    ``work/config``, and a node booted from an overlay of the image's disk, its
    maintenance API answering."""
    from basalt.machinery.client.config import load_client_config

    disk = _overlay(image_dir, work / "node.qcow2")
    out = work / "config"
    _ctl(
        *("gen", "config", "vm", f"https://{GUEST_ADDRESS}:6443", "-o", str(out)),
        *("--install-disk", "/dev/vda", "--additional-sans", "127.0.0.1"),
        *(a for patch in patches for a in ("--config-patch", json.dumps(patch))),
    )
    _, context = load_client_config(out / "basaltconfig").current()
    vm = Vm.boot_disk(disk, work, name="console-1")
    node = Installed(disk, work, out / "basaltconfig", context, vm)
    try:
        answer = vm.wait(
            lambda: call(vm.endpoint, "Version", _empty(), timeout=5),
            BOOT_TIMEOUT,
            "maintenance API (UEFI disk boot)",
        )
    except BaseException:
        vm.stop()
        raise
    assert answer.messages[0].mode == "maintenance"
    return node


@pytest.fixture(scope="module")
def installed(
    image_dir: Path, tmp_path_factory: pytest.TempPathFactory, timings: Timings
) -> Iterator[Installed]:
    patch = {"apiVersion": API, "kind": "MachineConfig", "install": {"extraKernelArgs": EXTRA}}
    node = boot_for_install(image_dir, tmp_path_factory.mktemp("install"), patch)
    vm, out = node.vm, node.workdir / "config"
    try:
        timings.record("uefi: QEMU start -> maintenance API answer", vm.mark("maintenance"))
        bad = out / "vdz.yaml"
        text = (out / "controlplane.yaml").read_text()
        assert text.count("disk: /dev/vda\n") == 1
        bad.write_text(text.replace("disk: /dev/vda\n", "disk: /dev/vdz\n"))
        node.refused = _apply(vm.endpoint, bad)
        node.untouched = _written_clusters(node.disk)
        started = time.monotonic()
        applied = _apply(vm.endpoint, out / "controlplane.yaml")
        assert applied.returncode == 0, applied.stdout + applied.stderr + vm.console_tail()
        node.applied = applied.stdout
        timings.record("uefi: apply-config (install) answered", time.monotonic() - started)
        node.reboot_from_disk("console-2")
        node.wait_mtls("mTLS API after install and reboot")
        elapsed = time.monotonic() - started
        timings.record("uefi: apply-config -> installed node answers mTLS", elapsed)
        yield node
    finally:
        node.vm.stop()
        timings.timelines["uefi install"] = node.vm.timeline()


def test_a_missing_install_disk_is_refused_and_nothing_is_written(installed: Installed) -> None:
    refused = installed.refused
    assert refused is not None and refused.returncode != 0
    assert "MachineConfig.install.disk: /dev/vdz does not exist on this node" in refused.stderr
    assert installed.untouched == []  # not one cluster written to the disk


def test_install_reboots_into_the_installed_system(installed: Installed, image_dir: Path) -> None:
    assert "installed to /dev/vda" in installed.applied
    first = installed.consoles[0]
    assert "installed: /dev/vda: EFI 128 MiB, BASALT-A 192 MiB" in first
    assert "installed to /dev/vda; rebooting into the installed system" in first
    (info,) = installed.call("Version").messages
    assert (info.mode, info.machine_type) == ("normal", "controlplane")
    schematic = json.loads((image_dir / "image.json").read_text())["schematic"]["id"]
    assert info.schematic == schematic  # the image's (here: the empty schematic's) id
    assert f"Schematic: {schematic}" in installed.ctl("version")
    assert "mounted /dev/vda2 read-only" in installed.vm.console_text()


def test_extra_kernel_args_are_in_the_installed_boot_entry(installed: Installed) -> None:
    """install.extraKernelArgs went into the entry on the ESP: the installed kernel got
    them after the image's own, before basalt.slot= (the image's entry has neither)."""
    cmdline = installed.ctl("read", "/proc/cmdline").split()
    assert cmdline[-3:] == [*EXTRA, "basalt.slot=A"], cmdline
    assert (
        "kernel arguments printk.devkmsg=on basalt.test=installed added to basalt-"
        in (installed.consoles[0])
    )


def test_state_and_ephemeral_are_ext4_partitions(installed: Installed) -> None:
    (answer,) = installed.call("Mounts").messages
    mounts = {m.mounted_on: m for m in answer.stats}
    assert mounts["/"].type == "squashfs" and "ro" in mounts["/"].options.split(",")
    assert (mounts["/var"].filesystem, mounts["/var"].type) == ("/dev/vda6", "ext4")
    assert mounts["/var"].size > 3 * 1024**3  # the rest of the 4 GiB disk
    state = mounts["/system/state"]
    assert (state.filesystem, state.type) == ("/dev/vda5", "ext4")
    assert state.size < 128 * 1024**2


def test_volumes_list_the_installed_partitions(installed: Installed) -> None:
    """``get volumes`` on metal: Basalt's partitions by GPT name, STATE mounted with usage."""
    records = [
        json.loads(line) for line in installed.ctl("get", "volumes", "-o", "json").splitlines()
    ]
    volumes = {r["metadata"]["id"]: r["spec"] for r in records}
    assert {"EFI", "BASALT-A", "BASALT-B", "META", "STATE", "EPHEMERAL"} <= set(volumes)
    state = volumes["STATE"]
    assert (state["device"], state["path"], state["filesystem"]) == (
        "/dev/vda5", "/system/state", "ext4"
    )  # fmt: skip
    assert state["mounted"] and 0 < state["used"] < state["size"] < 128 * 1024**2
    assert volumes["META"]["device"] == "/dev/vda4" and volumes["META"]["size"] == 1024**2
    disks = [json.loads(line) for line in installed.ctl("get", "disks", "-o", "json").splitlines()]
    (vda,) = [d["spec"] for d in disks if d["metadata"]["id"] == "vda"]
    assert vda["systemDisk"] and vda["transport"] == "virtio"
    assert {p["label"]: p["type"] for p in vda["partitions"]}["EFI"] == "efi"


def test_config_and_install_survive_another_reboot(installed: Installed) -> None:
    installed.ctl("reboot")
    installed.reboot_from_disk("console-3")
    (info,) = installed.wait_mtls("mTLS API after a second reboot").messages
    assert (info.mode, info.machine_type) == ("normal", "controlplane")
    third = installed.vm.console_text()
    assert "maintenance" not in third.split("API listening")[-1].split("\n")[0]
    (answer,) = installed.call("Mounts").messages
    mounts = {m.mounted_on: m.filesystem for m in answer.stats}
    assert (mounts["/var"], mounts["/system/state"]) == ("/dev/vda6", "/dev/vda5")


def _with_kernel_arg(image_dir: Path, disk: Path, argument: str) -> Path:
    """A sparse copy of disk.raw whose boot entry also passes ``argument``."""
    subprocess.run(["cp", "--sparse=always", str(image_dir / "disk.raw"), str(disk)], check=True)
    esp = f"{disk}@@{1024 * 1024}"  # EFI starts at 1 MiB (docs/adr/0011-disk-layout.md)
    listing = subprocess.run(
        ["mdir", "-b", "-i", esp, "::/loader/entries"], capture_output=True, text=True, check=True
    ).stdout.split()
    (entry,) = listing
    entry = "::" + entry.removeprefix("::")
    text = subprocess.run(
        ["mtype", "-i", esp, entry], capture_output=True, text=True, check=True
    ).stdout
    edited = "".join(
        f"{line.rstrip()} {argument}\n" if line.startswith("options ") else line
        for line in text.splitlines(keepends=True)
    )
    local = disk.with_name("entry.conf")
    local.write_text(edited)
    subprocess.run(["mcopy", "-o", "-i", esp, str(local), entry], check=True)
    return disk


@pytest.fixture
def config_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on host 127.0.0.1 (the guest's 10.0.2.2) serving ``tmp_path``."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://10.0.2.2:{httpd.server_address[1]}", tmp_path
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_basalt_config_url_installs_without_the_api(
    image_dir: Path, tmp_path: Path, config_server: tuple[str, Path], timings: Timings
) -> None:
    """``basalt.config=URL`` on the kernel command line: maintenance mode fetches the
    config from a host HTTP server, installs and reboots, with no apply-config."""
    from basalt.machinery.client.config import load_client_config

    url, served = config_server
    out = tmp_path / "config"
    _ctl(
        *("gen", "config", "vm", f"https://{GUEST_ADDRESS}:6443", "-o", str(out)),
        *("--install-disk", "/dev/vda", "--additional-sans", "127.0.0.1"),
    )
    (served / "node.yaml").write_text((out / "controlplane.yaml").read_text())
    _, context = load_client_config(out / "basaltconfig").current()
    disk = _with_kernel_arg(image_dir, tmp_path / "disk.raw", f"basalt.config={url}/node.yaml")
    overlay = tmp_path / "node.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "raw",
         str(overlay), DISK_SIZE],
        check=True,
    )  # fmt: skip
    vm = Vm.boot_disk(overlay, tmp_path, name="console-1")
    node = Installed(overlay, tmp_path, out / "basaltconfig", context, vm)
    try:
        node.reboot_from_disk("console-2")  # it installs and reboots by itself
        (info,) = node.wait_mtls("mTLS API after a config from basalt.config=").messages
        assert (info.mode, info.machine_type) == ("normal", "controlplane")
        timings.record("uefi: 2nd boot -> mTLS (config from URL)", node.vm.elapsed())
        assert f"config fetched from {url}/node.yaml" in node.consoles[0]
    finally:
        node.vm.stop()


def _esp_entries(disk: Path) -> dict[str, str]:
    """The boot entries on the ESP of a raw disk (EFI starts at 1 MiB), by name."""
    esp = f"{disk}@@{1024 * 1024}"
    listing = subprocess.run(
        ["mdir", "-b", "-i", esp, "::/loader/entries"], capture_output=True, text=True, check=True
    ).stdout.split()
    entries = {}
    for path in listing:
        entry = "::" + path.removeprefix("::")
        entries[entry.rsplit("/", 1)[-1]] = subprocess.run(
            ["mtype", "-i", esp, entry], capture_output=True, text=True, check=True
        ).stdout
    return entries


def test_install_to_a_second_disk_writes_the_kernel_args_there(
    image_dir: Path, tmp_path: Path, timings: Timings
) -> None:
    """Booted from the image, installing to a blank second disk (/dev/vdb): the image is
    copied there and install.extraKernelArgs go into the copy's boot entry (its ESP is
    written through a loop device: the kernel does not know the new partitions yet)."""
    from basalt.machinery.disk import gpt

    boot = _overlay(image_dir, tmp_path / "boot.qcow2")
    second = tmp_path / "second.raw"
    with second.open("wb") as stream:
        stream.truncate(2 * 1024**3)
    out = tmp_path / "config"
    patch = {"apiVersion": API, "kind": "MachineConfig", "install": {"extraKernelArgs": EXTRA}}
    _ctl(
        *("gen", "config", "vm", f"https://{GUEST_ADDRESS}:6443", "-o", str(out)),
        *("--install-disk", "/dev/vdb", "--config-patch", json.dumps(patch)),
    )
    drive = ("-drive", f"file={second},format=raw,if=none,id=d1")
    vm = Vm.boot_disk(boot, tmp_path, extra_args=(*drive, "-device", "virtio-blk-pci,drive=d1"))
    try:
        vm.wait(
            lambda: call(vm.endpoint, "Version", _empty(), timeout=5),
            BOOT_TIMEOUT,
            "maintenance API (two disks)",
        )
        started = time.monotonic()
        applied = _apply(vm.endpoint, out / "controlplane.yaml")
        assert applied.returncode == 0, applied.stdout + applied.stderr + vm.console_tail()
        assert "installed to /dev/vdb" in applied.stdout
        assert vm.process.wait(timeout=INSTALL_TIMEOUT) == 0, vm.console_tail()
        timings.record("uefi: apply-config to a second disk -> reboot", time.monotonic() - started)
    finally:
        vm.stop()
    fd = os.open(second, os.O_RDONLY)
    try:
        table = gpt.read(fd)
    finally:
        os.close(fd)
    assert [p.name for p in table.partitions] == [
        "EFI", "BASALT-A", "BASALT-B", "META", "STATE", "EPHEMERAL",
    ]  # fmt: skip
    (entry,) = _esp_entries(second).values()
    options = next(line for line in entry.splitlines() if line.startswith("options "))
    assert options.split()[-3:] == [*EXTRA, "basalt.slot=A"], entry
    assert "kernel arguments printk.devkmsg=on basalt.test=installed added to" in (
        vm.console_text()
    )
