"""Metal slot storage on real files: an ESP directory, META and slot "partitions" as
files of their size, efivarfs as a directory. systemd-boot's part (counting a try by
renaming the entry, and setting LoaderBootCountPath) is played with the same pure
functions the assessment model uses (:mod:`basalt.machinery.boot.entries`)."""

from __future__ import annotations

import asyncio
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from basalt.machined.boot.meta import (
    OFFSETS,
    SECOND_COPY,
    Meta,
    MetaRecord,
    PendingUpgrade,
    decode_copy,
)
from basalt.machined.boot.metal_slots import MetalDevices, MetalSlots
from basalt.machined.events import EventBus
from basalt.machined.sys import efivars
from basalt.machinery.boot import (
    GatesPassed,
    GatesTimedOut,
    LoaderEntry,
    Rollback,
    SlotHealth,
    SlotName,
    apply,
    boot_status,
    loader_order,
)
from basalt.machinery.boot.esp import entry_options, entry_text
from basalt.machinery.boot.slots import SlotWriteError
from tests.fakes import fat
from tests.fakes.bundles import CHANGES, Change, change, install, metal_bundle

A, B = SlotName.A, SlotName.B
MIB = 1 << 20
OPTIONS = "console=ttyS0 quiet panic=-1"


# -- META -----------------------------------------------------------------------------------------


def test_meta_keeps_two_copies_and_survives_a_torn_write(tmp_path: Path) -> None:
    device = tmp_path / "meta"
    device.write_bytes(bytes(MIB))
    meta = Meta(device)
    assert meta.read() == MetaRecord()  # a fresh, zeroed partition
    first = meta.write(MetaRecord({B: "health gates failed"}, PendingUpgrade(B, "0.2.0", 2)))
    second = meta.write(MetaRecord({B: "rolled back"}))
    assert (first.sequence, second.sequence) == (1, 2)
    read = meta.read()
    assert (read.reasons, read.pending, read.sequence) == ({B: "rolled back"}, None, 2)
    raw = device.read_bytes()
    copies = [decode_copy(raw[o : o + SECOND_COPY]) for o in OFFSETS]
    assert sorted(c.sequence for c in copies if c) == [1, 2]  # one in each copy
    # Tear the newest copy (a power cut mid-write): the other one is read.
    newest = next(o for o, c in zip(OFFSETS, copies, strict=True) if c and c.sequence == 2)
    with open(device, "r+b") as handle:
        handle.seek(newest + 70)
        handle.write(b"\xff" * 16)
    assert meta.read().reasons == {B: "health gates failed"}
    # The next write goes over the torn copy, never over the good one.
    meta.write(MetaRecord({A: "third"}))
    assert meta.read().reasons == {A: "third"}
    raw = device.read_bytes()
    survivors = [decode_copy(raw[o : o + SECOND_COPY]) for o in OFFSETS]
    assert sorted(c.sequence for c in survivors if c) == [1, 2]


def test_meta_on_a_missing_device_names_it(tmp_path: Path) -> None:
    from basalt.machined.boot.meta import MetaError

    with pytest.raises(MetaError, match=r"META .*nothing: No such file"):
        Meta(tmp_path / "nothing").read()


# -- efivars --------------------------------------------------------------------------------------


def _efivar(directory: Path, name: str, value: str) -> None:
    directory.mkdir(exist_ok=True)
    data = b"\x06\x00\x00\x00" + (value + "\0").encode("utf-16-le")
    (directory / f"{name}-{efivars.LOADER_GUID}").write_bytes(data)


def test_loader_boot_count_path_names_the_counted_entry(tmp_path: Path) -> None:
    assert efivars.boot_count_entry(tmp_path) is None
    _efivar(tmp_path, efivars.BOOT_COUNT_PATH, "\\loader\\entries\\basalt-2-b-0.2.0+2-1.conf")
    assert efivars.boot_count_entry(tmp_path) == "basalt-2-b-0.2.0+2-1.conf"
    _efivar(tmp_path, efivars.BOOT_COUNT_PATH, "\\EFI\\elsewhere\\x.conf")
    assert efivars.boot_count_entry(tmp_path) is None


# -- slots ----------------------------------------------------------------------------------------


#: The ESP of a node installed from the image: slot A's files and entry.
FRESH_ESP = {
    "EFI/basalt/A/vmlinuz": b"kernel-a",
    "EFI/basalt/A/initrd.img": b"initrd-a",
    "loader/entries/basalt-1-a-0.1.0.conf": entry_text("0.1.0", "a", OPTIONS).encode(),
}


def _machine(tmp_path: Path, booted: SlotName = A, *, fat_image: bool = False) -> MetalSlots:
    """A node's slots on files; the ESP a directory, or (``fat_image``) a real FAT32
    image mounted through mtools (tests.fakes.fat.MtoolsMount)."""
    esp = tmp_path / "esp"
    if fat_image:
        image = fat.make_image(tmp_path / "esp.img", FRESH_ESP)
    else:
        for path, data in FRESH_ESP.items():
            (esp / path).parent.mkdir(parents=True, exist_ok=True)
            (esp / path).write_bytes(data)
    (tmp_path / "meta").write_bytes(bytes(MIB))
    for name in "ab":
        (tmp_path / f"part-{name}").write_bytes(bytes(2 * MIB))
    devices = MetalDevices(
        esp_dir=esp,
        meta=tmp_path / "meta",
        partitions={A: tmp_path / "part-a", B: tmp_path / "part-b"},
        efivars=tmp_path / "efivars",
        staged_dir=tmp_path / "var/staged",
        esp_device=str(image) if fat_image else None,
    )
    return MetalSlots(devices, booted, fat.MtoolsMount() if fat_image else None)


def _firmware_boot(tmp_path: Path, slots: MetalSlots) -> MetalSlots:
    """systemd-boot: boot the first entry, counting a try; return the booted system's view."""
    entries = slots.devices.esp_dir / "loader/entries"
    first = loader_order(os.listdir(entries))[0]
    entry = LoaderEntry.parse(first)
    renamed = entry.next_name()
    os.rename(entries / first, entries / renamed)
    if entry.tries_left is not None:
        _efivar(slots.devices.efivars, efivars.BOOT_COUNT_PATH, f"\\loader\\entries\\{renamed}")
    else:
        (slots.devices.efivars / f"{efivars.BOOT_COUNT_PATH}-{efivars.LOADER_GUID}").unlink(
            missing_ok=True
        )
    slot = SlotName(renamed.split("-")[2])
    return MetalSlots(slots.devices, slot)


def test_upgrade_writes_the_other_slot_and_a_counted_entry_that_boots_first(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    slots = _machine(tmp_path)
    state = slots.load()
    assert state is not None and state.a.health is SlotHealth.GOOD and state.b.version is None
    root = os.urandom(300_000)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", root))
    entries = sorted(os.listdir(tmp_path / "esp/loader/entries"))
    assert entries == ["basalt-1-a-0.1.0.conf", "basalt-2-b-0.2.0+3.conf"]
    assert loader_order(entries)[0] == "basalt-2-b-0.2.0+3.conf"
    text = (tmp_path / "esp/loader/entries/basalt-2-b-0.2.0+3.conf").read_text()
    assert text == entry_text("0.2.0", "b", OPTIONS)
    assert "linux /EFI/basalt/B/vmlinuz" in text and text.endswith("basalt.slot=B\n")
    assert entry_options(text) == OPTIONS
    assert (tmp_path / "esp/EFI/basalt/B/vmlinuz").read_bytes() == b"kernel-0.2.0"
    assert (tmp_path / "part-b").read_bytes()[: len(root)] == root
    assert (tmp_path / "part-a").read_bytes() == bytes(2 * MIB)  # the running slot untouched
    assert slots.meta.read().pending == PendingUpgrade(B, "0.2.0", 2)
    assert not list((tmp_path / "esp").rglob(".*"))  # no temporary files left

    # The firmware boots B on trial; its gates pass: the entry LoaderBootCountPath names
    # is renamed without its counter.
    booted = _firmware_boot(tmp_path, slots)
    state = booted.load()
    assert state is not None and state.booted is B and state.b.tries_left == 2
    booted.save(apply(state, GatesPassed()).state)
    assert sorted(os.listdir(tmp_path / "esp/loader/entries")) == [
        "basalt-1-a-0.1.0.conf",
        "basalt-2-b-0.2.0.conf",
    ]
    assert booted.meta.read().pending is None
    again = _firmware_boot(tmp_path, booted)
    assert again.booted is B  # the good, newest entry keeps booting


def test_a_failing_slot_falls_back_with_its_reason_from_meta(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    slots = _machine(tmp_path)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", b"broken-root"))
    current = slots
    for _ in range(3):
        current = _firmware_boot(tmp_path, current)
        assert current.booted is B
        state = current.load()
        assert state is not None
        current.save(apply(state, GatesTimedOut(20, ("broken",))).state)
    fell_back = _firmware_boot(tmp_path, current)
    assert fell_back.booted is A  # +0-3 sorts last: the previous entry boots
    state = fell_back.load()
    assert state is not None and state.b.health is SlotHealth.BAD
    status = boot_status(state)
    assert status is not None and status.fell_back_from == "b"
    assert status.reason == (
        "health gates did not pass within 20 s (waiting for broken); its 3 boot tries ran out"
    )
    # Rollback to the failed slot is refused; a new install replaces it.
    assert apply(state, Rollback()).refused
    install(fell_back, metal_bundle(tmp_path, keypair, "0.3.0", b"fixed-root"))
    assert "basalt-3-b-0.3.0+3.conf" in os.listdir(tmp_path / "esp/loader/entries")


def test_rollback_renames_both_entries_and_the_other_slot_boots(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    slots = _machine(tmp_path)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", b"root"))
    on_b = _firmware_boot(tmp_path, slots)
    state = on_b.load()
    assert state is not None
    on_b.save(apply(state, GatesPassed()).state)
    state = on_b.load()
    assert state is not None and on_b.missing(state.a) is None
    outcome = apply(state, Rollback())
    on_b.save(outcome.state)
    assert sorted(os.listdir(tmp_path / "esp/loader/entries")) == [
        "basalt-2-b-0.2.0.conf",
        "basalt-3-a-0.1.0.conf",
    ]
    assert _firmware_boot(tmp_path, on_b).booted is A
    (tmp_path / "esp/EFI/basalt/B/initrd.img").unlink()
    assert on_b.missing(state.b) == "/EFI/basalt/B/initrd.img missing from the ESP"


@pytest.mark.parametrize("how", CHANGES)
def test_a_bundle_changed_after_verification_leaves_the_slot_without_an_entry(
    tmp_path: Path, keypair: tuple[str, str], how: Change
) -> None:
    slots = _machine(tmp_path)
    bundle = metal_bundle(tmp_path, keypair, "0.2.0", b"R" * 5000)
    change(bundle, how)
    with pytest.raises(SlotWriteError, match=f"changed after it was verified: {CHANGES[how]}"):
        install(slots, bundle)
    assert os.listdir(tmp_path / "esp/loader/entries") == ["basalt-1-a-0.1.0.conf"]
    assert (tmp_path / "part-b").read_bytes() == bytes(2 * MIB)  # refused before writing


def test_refusals_write_nothing(tmp_path: Path, keypair: tuple[str, str]) -> None:
    slots = _machine(tmp_path)
    bundle = metal_bundle(tmp_path, keypair, "0.2.0", b"r" * (2 * MIB + 1))
    with pytest.raises(SlotWriteError, match=r"rootfs.squashfs is 2097153 bytes; partition"):
        slots.write(B, bundle)
    with pytest.raises(SlotWriteError, match="slot a is running"):
        slots.write(A, bundle)
    assert not (tmp_path / "esp/EFI/basalt/B").exists()
    assert (tmp_path / "part-b").read_bytes() == bytes(2 * MIB)


def test_manifest_and_signature_come_first_so_an_upload_is_checked_as_it_arrives(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    bundle = metal_bundle(tmp_path, keypair, "0.2.0", b"root")
    with tarfile.open(bundle.source) as tar:
        assert tar.getnames()[:2] == ["manifest.json", "manifest.sig"]


def test_a_torn_rename_reads_as_the_loader_s_first_name_until_it_is_repaired(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    slots = _machine(tmp_path)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", b"root"))
    entries = tmp_path / "esp/loader/entries"
    text = (entries / "basalt-2-b-0.2.0+3.conf").read_text()
    (entries / "basalt-2-b-0.2.0+2-1.conf").write_text(text)  # the firmware's rename, torn
    on_b = MetalSlots(slots.devices, B)
    state = on_b.load()
    assert state is not None and (state.b.tries_left, state.b.tries_done) == (3, 0)
    with pytest.raises(SlotWriteError, match=r"slot b still has a boot entry \(basalt-2-b"):
        slots.write(B, metal_bundle(tmp_path, keypair, "0.3.0", b"root3"))
    # At boot: the name systemd-boot boots first stays; the other goes.
    (removal,) = on_b.repair().removals
    assert removal.path == "loader/entries/basalt-2-b-0.2.0+2-1.conf"
    assert sorted(os.listdir(entries)) == ["basalt-1-a-0.1.0.conf", "basalt-2-b-0.2.0+3.conf"]
    assert on_b.repair().removals == ()  # idempotent
    assert on_b.load() == state


def _fat_upgrade(tmp_path: Path, keypair: tuple[str, str]) -> tuple[MetalSlots, Path]:
    """A FAT ESP after an upgrade to 0.2.0 whose first boot of B was cut in systemd-boot's
    rename of its entry (+3 -> +2-1): two names, one cluster chain."""
    slots = _machine(tmp_path, fat_image=True)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", b"root"))
    image = Path(str(slots.devices.esp_device))
    assert fat.listing(image, "loader/entries") == [
        "basalt-1-a-0.1.0.conf",
        "basalt-2-b-0.2.0+3.conf",
    ]
    assert fat.fsck(image)[0] == 0
    fat.second_name(image, "loader/entries/basalt-2-b-0.2.0+3.conf", "basalt-2-b-0.2.0+2-1.conf")
    assert "share clusters" in fat.fsck(image)[1]
    return slots, image


def test_on_a_fat_esp_the_repair_erases_the_second_name_and_frees_nothing(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    slots, image = _fat_upgrade(tmp_path, keypair)
    on_b = MetalSlots(slots.devices, B, slots._mounter)
    done = on_b.repair()
    assert [(r.path, r.how.value) for r in done.removals] == [
        ("loader/entries/basalt-2-b-0.2.0+2-1.conf", "erase")
    ]
    assert done.left == ()
    assert fat.listing(image, "loader/entries") == [
        "basalt-1-a-0.1.0.conf",
        "basalt-2-b-0.2.0+3.conf",
    ]
    assert (
        fat.read(image, "loader/entries/basalt-2-b-0.2.0+3.conf")
        == entry_text("0.2.0", "b", OPTIONS).encode()
    )
    code, said = fat.fsck(image)
    assert code == 0, said
    assert on_b.repair().removals == ()


def test_on_a_fat_esp_leftovers_of_an_interrupted_install_are_removed_and_it_runs_again(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    """Back on A (B fell back): an install into B was cut twice: once in the rename of
    its kernel over the old one (the temporary name and the kernel share clusters), once
    while writing its initrd (a temporary file of its own). The repair removes both, and
    the next install of B works and leaves a clean FAT."""
    slots, image = _fat_upgrade(tmp_path, keypair)
    on_a = MetalSlots(slots.devices, A, slots._mounter)
    on_a.repair()
    fat.second_name(image, "EFI/basalt/B/vmlinuz", ".vmlinuz.Q1w2E3")
    fat.put(image, "EFI/basalt/B/.initrd.img.Zz9Yy8", b"half an initrd")
    done = on_a.repair()
    assert sorted((r.path, r.how.value) for r in done.removals) == [
        ("EFI/basalt/B/.initrd.img.Zz9Yy8", "unlink"),
        ("EFI/basalt/B/.vmlinuz.Q1w2E3", "erase"),
    ]
    code, said = fat.fsck(image)
    assert code == 0, said
    install(on_a, metal_bundle(tmp_path, keypair, "0.3.0", b"root3"))
    assert fat.listing(image, "EFI/basalt/B") == ["chunks.json", "initrd.img", "vmlinuz"]
    assert fat.read(image, "EFI/basalt/B/vmlinuz") == b"kernel-0.3.0"
    assert "basalt-3-b-0.3.0+3.conf" in fat.listing(image, "loader/entries")
    code, said = fat.fsck(image)
    assert code == 0, said


def test_a_problem_in_the_running_slot_is_left_alone_and_named(tmp_path: Path) -> None:
    slots = _machine(tmp_path, fat_image=True)
    image = Path(str(slots.devices.esp_device))
    fat.freed(image, "EFI/basalt/A/vmlinuz")
    done = slots.repair()
    assert done.removals == ()
    (left,) = done.left
    assert re.fullmatch(
        r"EFI/basalt/A/vmlinuz: cluster \d+ is marked free in the FAT; left alone: slot a has "
        "a boot entry",
        left,
    )


def test_a_staged_bundle_waits_on_ephemeral(tmp_path: Path, keypair: tuple[str, str]) -> None:
    slots = _machine(tmp_path)
    bundle = metal_bundle(tmp_path, keypair, "0.2.0", b"root")
    assert slots.staged() is None
    slots.stage(bundle.source)
    staged = slots.staged()
    assert staged is not None and staged.read_bytes() == bundle.source.read_bytes()
    assert staged.parent == tmp_path / "var/staged"
    slots.clear_staged()
    assert slots.staged() is None


def test_at_boot_large_chains_are_followed_only_next_to_a_leftover(tmp_path: Path) -> None:
    """A boot's check follows entries, temporary files and directories holding one; an
    install's check follows every chain (a kernel's is tens of thousands of clusters)."""
    slots = _machine(tmp_path, fat_image=True)
    image = Path(str(slots.devices.esp_device))
    fat.freed(image, "EFI/basalt/A/vmlinuz")
    assert slots.repair(thorough=False).left == ()
    assert len(slots.repair(thorough=True).left) == 1
    fat.second_name(image, "EFI/basalt/A/initrd.img", ".initrd.img.a1B2c3")  # a cut rename
    done = slots.repair(thorough=False)
    assert [r.path for r in done.removals] == ["EFI/basalt/A/.initrd.img.a1B2c3"]
    assert len(done.left) == 1 and done.left[0].startswith("EFI/basalt/A/vmlinuz: cluster ")


@dataclass
class _Node:
    """What Upgrader.repair_esp touches of a node: its platform mode and its events."""

    events: EventBus = field(default_factory=EventBus)
    platform: Any = field(
        default_factory=lambda: SimpleNamespace(mode=SimpleNamespace(in_container=False))
    )


def test_each_repair_and_each_problem_left_is_an_event_naming_the_file(tmp_path: Path) -> None:
    from basalt.machined.upgrade import Upgrader

    slots = _machine(tmp_path, fat_image=True)
    image = Path(str(slots.devices.esp_device))
    fat.second_name(image, "loader/entries/basalt-1-a-0.1.0.conf", "basalt-3-a-0.1.0.conf")
    fat.freed(image, "EFI/basalt/A/initrd.img")
    node = _Node()
    upgrader = Upgrader(node)  # type: ignore[arg-type]
    upgrader.slots = slots
    asyncio.run(upgrader.repair_esp())
    repaired, left = (e for e in node.events.history())
    assert (repaired.type, repaired.actor, repaired.fields) == (
        "boot",
        "boot",
        {"path": "loader/entries/basalt-1-a-0.1.0.conf"},
    )
    assert repaired.message.startswith(
        "ESP repaired: removed loader/entries/basalt-1-a-0.1.0.conf: a second name for slot "
        "a's boot entry, left by an interrupted rename; basalt-3-a-0.1.0.conf stays"
    )
    assert left.message.startswith("ESP check: EFI/basalt/A/initrd.img: cluster ")
    (image.parent / "esp.img").write_bytes(b"not FAT any more" * 64)
    asyncio.run(upgrader.repair_esp())
    assert node.events.history()[-1].message == (
        "ESP check failed (it runs again at the next boot): no FAT boot sector (signature 55 "
        "AA missing)"
    )


# -- chunk indexes: what a delta upload may leave out -----------------------------------------


def test_a_written_slot_keeps_its_chunk_index_and_a_delta_is_assembled_from_it(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    import hashlib
    import random

    from basalt.machinery.images import verification_key
    from basalt.machinery.images.delta import assemble, delta_upload

    slots = _machine(tmp_path)
    assert slots.running_index() is None  # the fresh ESP's slot A has none
    rng = random.Random(5)
    root = rng.randbytes(1_200_000)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", root))
    index = (tmp_path / "esp/EFI/basalt/B/chunks.json").read_bytes()
    booted = _firmware_boot(tmp_path, slots)
    assert booted.running_index() == index
    booted.save(apply(booted.load(), GatesPassed()).state)  # type: ignore[arg-type]

    # 0.3.0 changes a few bytes in the middle of the root: the rest comes from slot B
    newer = bytearray(root)
    newer[600_000:600_010] = b"0123456789"
    bundle = metal_bundle(tmp_path, keypair, "0.3.0", bytes(newer))
    upload = delta_upload(bundle.source, index)
    assert upload is not None and upload.size < 300_000
    sha = hashlib.sha256(index).hexdigest()
    out = tmp_path / "assembled.tar"
    trusted = [verification_key(keypair[1])]
    with booted.holding(sha) as held, open(out, "wb", buffering=0) as handle:
        stream = io.BytesIO(b"".join(upload.pieces()))
        verified = assemble(stream, handle.fileno(), out, trusted, "x86_64", held)
    assert out.read_bytes() == bundle.source.read_bytes()
    install(booted, verified)
    assert (tmp_path / "part-a").read_bytes()[: len(newer)] == newer
    assert (tmp_path / "esp/EFI/basalt/A/chunks.json").exists()

    with pytest.raises(SlotWriteError) as err, booted.holding("0" * 64):
        pass
    assert "it has another" in str(err.value)


def test_a_slot_index_that_does_not_fit_the_slot_is_not_offered(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    slots = _machine(tmp_path)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", os.urandom(100_000)))
    booted = _firmware_boot(tmp_path, slots)
    (tmp_path / "esp/EFI/basalt/B/vmlinuz").write_bytes(b"another kernel")
    assert booted.running_index() is None
    (tmp_path / "esp/EFI/basalt/B/chunks.json").write_bytes(b"{not json")
    assert booted.running_index() is None


def test_rewriting_a_slot_drops_its_old_index_first(
    tmp_path: Path, keypair: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from basalt.machined.boot import metal_slots

    slots = _machine(tmp_path)
    install(slots, metal_bundle(tmp_path, keypair, "0.2.0", os.urandom(100_000)))
    assert (tmp_path / "esp/EFI/basalt/B/chunks.json").exists()
    booted = _firmware_boot(tmp_path, slots)
    booted.save(apply(booted.load(), GatesPassed()).state)  # type: ignore[arg-type]
    again = _firmware_boot(tmp_path, booted)
    # writing A fails half way: A has no index left over to describe its old bytes
    (tmp_path / "esp/EFI/basalt/A/chunks.json").write_bytes(b"stale")

    def fails(*_: object) -> None:
        raise SlotWriteError("disk full")

    monkeypatch.setattr(metal_slots, "_write_partition", fails)
    with pytest.raises(SlotWriteError):
        install(again, metal_bundle(tmp_path, keypair, "0.3.0", os.urandom(100_000)))
    assert not (tmp_path / "esp/EFI/basalt/A/chunks.json").exists()
