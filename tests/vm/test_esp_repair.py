"""A torn FAT rename on a real ESP, repaired at boot (QEMU, OVMF, systemd-boot, vfat).

An installed, bootstrapped control plane is powered off and its ESP (1 MiB into the
disk, 128 MiB) is given what power cuts leave (tests.fakes.fat): a second name for slot
A's entry on the same clusters, ``+2-1`` (marking it good was cut), a temporary file
sharing the clusters of A's initrd (its rename over the old one was cut), and a
temporary entry file of its own (a write cut before its rename). ``fsck.fat`` sees the
shared clusters. Booted again, systemd-boot boots the counted name first (renaming it
``+1-2``); machined erases the plain name without freeing its clusters (they are the
counted name's), removes both temporary files, and publishes an event for each; the
slot on trial passes its gates and is marked good by renaming ``+1-2`` back to the
plain name, which would have freed the shared clusters had the second name still been
there. Powered off again, the ESP has one entry, the initrd unchanged, and fsck finds
nothing.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import fat
from tests.vm.conftest import Timings
from tests.vm.machine import Vm, call
from tests.vm.test_install import (
    BOOT_TIMEOUT,
    INSTALL_TIMEOUT,
    Installed,
    _apply,
    boot_for_install,
)
from tests.vm.test_metal_node import _empty

pytestmark = pytest.mark.vm

MIB = 1 << 20
ESP_OFFSET, ESP_SIZE = 1 * MIB, 128 * MIB  # docs/adr/0011-disk-layout.md
ENTRIES = "loader/entries"


def _esp_out(disk: Path, out: Path) -> Path:
    """The ESP of the qcow2 ``disk`` as an image file."""
    raw = out.with_suffix(".disk.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    with open(raw, "rb") as source, open(out, "wb") as esp:
        source.seek(ESP_OFFSET)
        esp.write(source.read(ESP_SIZE))
    raw.unlink()
    return out


def _esp_in(disk: Path, esp: Path) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {esp} {ESP_OFFSET} {ESP_SIZE}", str(disk)],
        check=True,
        capture_output=True,
    )


def _power_off(node: Installed) -> None:
    """``basaltctl reboot`` under -no-reboot: QEMU exits once the guest is down."""
    node.ctl("reboot")
    code = node.vm.process.wait(timeout=INSTALL_TIMEOUT)
    assert code == 0, node.vm.console_tail()
    node.consoles.append(node.vm.console_text())


def _boot_status(node: Installed) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(
        node.ctl("get", "bootstatuses", "-o", "json").splitlines()[0]
    )["spec"]
    return spec


@pytest.fixture(scope="module")
def node(
    image_dir: Path, tmp_path_factory: pytest.TempPathFactory, timings: Timings
) -> Iterator[Installed]:
    """Installed from the image's disk as a control plane, etcd bootstrapped, healthy."""
    node = boot_for_install(image_dir, tmp_path_factory.mktemp("esp-repair"))
    vm, out, context = node.vm, node.workdir / "config", node.context
    try:
        applied = _apply(vm.endpoint, out / "controlplane.yaml")
        assert applied.returncode == 0, applied.stdout + applied.stderr + vm.console_tail()
        node.reboot_from_disk("console-2")
        node.wait_mtls("mTLS API after install")
        node.ctl("bootstrap")

        async def healthy() -> Any:
            answer = await call(node.vm.endpoint, "Health", _empty(), context=context, timeout=5)
            assert answer.messages[0].healthy
            return answer

        node.vm.wait(healthy, BOOT_TIMEOUT, "healthy after bootstrap", poll=2)
        timings.record("esp repair: QEMU start -> installed, bootstrapped", vm.elapsed())
        yield node
    finally:
        node.vm.stop()


def test_a_torn_rename_is_repaired_at_boot_and_the_entry_marked_good(
    node: Installed, timings: Timings
) -> None:
    _power_off(node)
    esp = _esp_out(node.disk, node.workdir / "esp.img")
    (plain,) = fat.listing(esp, ENTRIES)
    counted = plain.removesuffix(".conf") + "+2-1.conf"
    initrd = fat.read(esp, "EFI/basalt/A/initrd.img")
    fat.second_name(esp, f"{ENTRIES}/{plain}", counted)
    fat.second_name(esp, "EFI/basalt/A/initrd.img", ".initrd.img.Xy12ab")
    fat.put(esp, f"{ENTRIES}/.basalt-2-b-9.9.9+3.conf.Qw12er", b"title half-written\n")
    code, said = fat.fsck(esp)
    assert code == 1 and said.count("share clusters") == 2, said
    _esp_in(node.disk, esp)

    node.vm = Vm.boot_disk(node.disk, node.workdir, port=node.vm.port, name="console-torn")
    node.wait_mtls("mTLS API after the torn ESP")
    timings.record("esp repair: boot with a torn ESP -> mTLS", node.vm.elapsed())
    repaired = [line for line in node.ctl("events").splitlines() if "ESP repaired" in line]
    assert len(repaired) == 3, repaired
    erased = next(line for line in repaired if f"{ENTRIES}/{plain}" in line)
    assert "systemd-boot boots" in erased and "its clusters not freed" in erased
    assert any(".initrd.img.Xy12ab" in line and "not freed" in line for line in repaired)
    assert any(".basalt-2-b-9.9.9+3.conf.Qw12er" in line for line in repaired)

    def marked_good() -> dict[str, Any] | None:
        status = _boot_status(node)
        return status if status.get("slot") == "a" and not status.get("onTrial") else None

    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline and marked_good() is None:
        time.sleep(5)
    assert marked_good() is not None, (_boot_status(node), node.vm.console_tail())
    assert any("on trial" in line for line in node.ctl("events").splitlines())
    timings.record("esp repair: torn boot -> entry marked good", node.vm.elapsed())

    _power_off(node)
    esp = _esp_out(node.disk, node.workdir / "esp-after.img")
    assert fat.listing(esp, ENTRIES) == [plain]
    assert fat.listing(esp, "EFI/basalt/A") == ["initrd.img", "vmlinuz"]
    assert fat.read(esp, "EFI/basalt/A/initrd.img") == initrd
    code, said = fat.fsck(esp)
    assert code == 0, said
