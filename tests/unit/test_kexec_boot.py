"""A kexec reboot into a slot follows systemd-boot's rules: the entry that would boot
first is the one loaded (its kernel, initrd and options), its try is counted by the same
rename, and the booted system finds its entry on the command line (``basalt.entry=``)
instead of the LoaderBootCountPath the firmware left from the boot before. Nothing
changes when the kernel refuses. Metal slots on files, as in test_metal_slots; the
kexec_file_load(2) call is recorded, never made."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from basalt.machined.boot.metal_slots import KEXEC_ENTRY_ARG, MetalSlots, kexec_entry
from basalt.machined.sys import efivars
from basalt.machined.sys.kexec import KexecError
from basalt.machinery.boot import (
    GatesPassed,
    LoaderEntry,
    Rollback,
    SlotHealth,
    apply,
    loader_order,
)
from basalt.machinery.boot.esp import Esp, EspError, entry_boot, entry_text
from tests.fakes.bundles import install, metal_bundle
from tests.unit.test_metal_slots import OPTIONS, A, B, _efivar, _firmware_boot, _machine


@dataclass
class Kernel:
    """kexec_file_load as the slots call it: what was loaded, or a refusal."""

    refuse: str | None = None
    loaded: list[tuple[bytes, bytes | None, str]] = field(default_factory=list)
    unloads: int = 0

    def load(self, kernel: Path, initrd: Path | None, cmdline: str) -> None:
        if self.refuse:
            raise KexecError(f"kexec_file_load: {self.refuse}")
        self.loaded.append((kernel.read_bytes(), initrd.read_bytes() if initrd else None, cmdline))

    def unload(self) -> None:
        self.unloads += 1
        self.loaded.clear()


def _entries(slots: MetalSlots) -> list[str]:
    return sorted(os.listdir(slots.devices.esp_dir / "loader/entries"))


def _kexec_boot(tmp_path: Path, slots: MetalSlots, kernel: Kernel) -> MetalSlots:
    """Prepare the kexec, then boot it: the new system's /proc/cmdline is what was loaded;
    the firmware's variables are the previous boot's."""
    slots.prepare_kexec(kernel.load, kernel.unload)
    _, _, cmdline = kernel.loaded[-1]
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    slot = next(w for w in cmdline.split() if w.startswith("basalt.slot=")).partition("=")[2]
    devices = replace(slots.devices, cmdline=tmp_path / "cmdline")
    return MetalSlots(devices, type(slots.booted)(slot.lower()))


def test_after_an_upgrade_kexec_loads_the_new_slot_and_counts_its_try(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    slots = _machine(tmp_path)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", b"root-0.2.0"))
    kernel = Kernel()
    entry = slots.prepare_kexec(kernel.load, kernel.unload)
    assert entry == "basalt-2-b-0.2.0+2-1.conf"
    assert kernel.loaded == [
        (b"kernel-0.2.0", b"initrd", f"{OPTIONS} basalt.slot=B {KEXEC_ENTRY_ARG}={entry}")
    ]
    assert _entries(slots) == ["basalt-1-a-0.1.0.conf", entry]  # counted as systemd-boot does


def test_a_kexec_boot_reads_as_the_firmware_boot_of_the_same_disk(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    slots = _machine(tmp_path / "kexec")
    install(slots, metal_bundle(tmp_path / "kexec", keypair, "0.2.0", b"root"))
    shutil.copytree(tmp_path / "kexec", tmp_path / "firmware", symlinks=True)
    twin = MetalSlots(
        replace(
            slots.devices,
            esp_dir=tmp_path / "firmware/esp",
            meta=tmp_path / "firmware/meta",
            partitions={A: tmp_path / "firmware/part-a", B: tmp_path / "firmware/part-b"},
            efivars=tmp_path / "firmware/efivars",
        ),
        A,
    )
    by_kexec = _kexec_boot(tmp_path / "kexec", slots, Kernel())
    by_firmware = _firmware_boot(tmp_path / "firmware", twin)
    assert by_kexec.booted is by_firmware.booted is B
    assert by_kexec.load() == by_firmware.load()
    assert _entries(by_kexec) == _entries(by_firmware)


def test_marking_good_after_kexec_renames_the_entry_the_command_line_names(
    tmp_path: Path, keypair: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    slots = _machine(tmp_path)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", b"root"))
    # The firmware's memory still holds what systemd-boot said at the boot before (here
    # a counted name the ESP no longer has): a kexec boot must not use it.
    _efivar(
        slots.devices.efivars,
        efivars.BOOT_COUNT_PATH,
        "\\loader\\entries\\basalt-1-a-0.1.0+1-2.conf",
    )
    booted = _kexec_boot(tmp_path, slots, Kernel())
    assert kexec_entry(booted.devices.cmdline) == "basalt-2-b-0.2.0+2-1.conf"
    state = booted.load()
    assert state is not None and state.booted is B and state.b.health is SlotHealth.PENDING
    assert (state.b.tries_left, state.b.tries_done) == (2, 1)
    booted.save(apply(state, GatesPassed()).state)
    assert _entries(booted) == ["basalt-1-a-0.1.0.conf", "basalt-2-b-0.2.0.conf"]
    assert "the boot names entry" not in caplog.text  # no mismatch: the stale one is unread


def test_a_rollback_kexecs_into_the_good_slot_without_counting(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    slots = _machine(tmp_path)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", b"root"))
    on_b = _kexec_boot(tmp_path, slots, Kernel())
    state = on_b.load()
    assert state is not None
    on_b.save(apply(state, GatesPassed()).state)
    state = on_b.load()
    assert state is not None
    on_b.save(apply(state, Rollback()).state)
    kernel = Kernel()
    on_a = _kexec_boot(tmp_path, on_b, kernel)
    assert kernel.loaded[0][0] == b"kernel-a"
    assert kernel.loaded[0][2].endswith(f"basalt.slot=A {KEXEC_ENTRY_ARG}=basalt-3-a-0.1.0.conf")
    assert _entries(on_a) == ["basalt-2-b-0.2.0.conf", "basalt-3-a-0.1.0.conf"]
    state = on_a.load()
    assert state is not None and state.booted is A and state.a.health is SlotHealth.GOOD


def test_a_refused_kexec_changes_nothing_and_the_firmware_boots_the_same_entry(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    slots = _machine(tmp_path)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", b"root"))
    before = _entries(slots)
    kernel = Kernel(refuse="the kernel refuses kexec (kernel.kexec_load_disabled is 1)")
    with pytest.raises(KexecError, match="kexec_load_disabled"):
        slots.prepare_kexec(kernel.load, kernel.unload)
    assert _entries(slots) == before and not kernel.loaded
    assert _firmware_boot(tmp_path, slots).booted is B
    assert _entries(slots) == ["basalt-1-a-0.1.0.conf", "basalt-2-b-0.2.0+2-1.conf"]


def test_when_the_try_cannot_be_counted_the_kernel_is_unloaded(
    tmp_path: Path, keypair: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = _machine(tmp_path)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", b"root"))
    before = _entries(slots)

    def broken(self: Esp, old: str, new: str) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Esp, "rename_entry", broken)
    kernel = Kernel()
    with pytest.raises(
        EspError, match=re.escape("counting the try of basalt-2-b-0.2.0+3.conf failed")
    ):
        slots.prepare_kexec(kernel.load, kernel.unload)
    assert kernel.unloads == 1 and not kernel.loaded
    assert _entries(slots) == before


def test_with_no_tries_left_anywhere_the_firmware_decides(tmp_path: Path) -> None:
    slots = _machine(tmp_path)
    entries = slots.devices.esp_dir / "loader/entries"
    os.rename(entries / "basalt-1-a-0.1.0.conf", entries / "basalt-1-a-0.1.0+0-3.conf")
    kernel = Kernel()
    with pytest.raises(KexecError, match="no tries left: the firmware chooses"):
        slots.prepare_kexec(kernel.load, kernel.unload)
    assert not kernel.loaded and os.listdir(entries) == ["basalt-1-a-0.1.0+0-3.conf"]


def test_the_entry_is_read_as_systemd_boot_reads_it() -> None:
    kernel, initrd, options = entry_boot(entry_text("0.2.0", "b", OPTIONS))
    assert (str(kernel), str(initrd)) == ("/EFI/basalt/B/vmlinuz", "/EFI/basalt/B/initrd.img")
    assert options == f"{OPTIONS} basalt.slot=B"
    kernel, initrd, _ = entry_boot("linux \\EFI\\x\\vmlinuz\noptions quiet\n")
    assert str(kernel) == "/EFI/x/vmlinuz" and initrd is None
    with pytest.raises(EspError, match="no linux line"):
        entry_boot("title x\noptions quiet\n")
    assert Esp(Path("/esp")).path(kernel) == Path("/esp/EFI/x/vmlinuz")


def test_the_command_line_names_the_kexec_entry(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    assert kexec_entry(cmdline) is None  # unreadable: a firmware boot
    cmdline.write_text("console=ttyS0 basalt.slot=B\n")
    assert kexec_entry(cmdline) is None
    cmdline.write_text(f"quiet {KEXEC_ENTRY_ARG}=basalt-2-b-0.2.0+2-1.conf basalt.slot=B\n")
    assert kexec_entry(cmdline) == "basalt-2-b-0.2.0+2-1.conf"
    assert LoaderEntry.parse(kexec_entry(cmdline) or "").tries_left == 2
    assert loader_order(["basalt-1-a-0.1.0.conf", "basalt-2-b-0.2.0+2-1.conf"])[0].startswith(
        "basalt-2-b"
    )


def test_the_reboot_goes_on_through_the_firmware_whatever_kexec_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from basalt.machined.upgrade import upgrader as upgrade

    node = SimpleNamespace(
        platform=SimpleNamespace(mode=SimpleNamespace(in_container=False)),
        paths=SimpleNamespace(root=tmp_path),
    )
    upgrader = upgrade.Upgrader(node)  # type: ignore[arg-type]
    assert upgrader.prepare_kexec().startswith("rebooting: the launcher")  # no metal slots
    slots = _machine(tmp_path)
    upgrader.slots = slots
    assert upgrader.prepare_kexec() == "rebooting through the firmware: only PID 1 can kexec"
    monkeypatch.setattr(upgrade.os, "getpid", lambda: 1)
    for error in (
        KexecError("kexec_file_load: refused"),
        UnicodeEncodeError("ascii", "é", 0, 1, "x"),
    ):

        def failing(error: Exception = error) -> str:
            raise error

        monkeypatch.setattr(slots, "prepare_kexec", failing)
        message = upgrader.prepare_kexec()
        assert message.startswith("rebooting through the firmware: kexec not prepared: ")
    monkeypatch.setattr(slots, "prepare_kexec", lambda: "basalt-2-b-0.2.0+2-1.conf")
    assert upgrader.prepare_kexec() == "rebooting by kexec into basalt-2-b-0.2.0+2-1.conf"
