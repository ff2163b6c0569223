"""The FAT reader and its one write, on images made by mkfs.fat and mtools, judged by
fsck.fat: names (long, short, lowercase 8.3, dot files), chains, the torn states a power
cut leaves, and ``erase`` removing a name without freeing anything."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from basalt.machined.boot.fat import Chain, FatError, FatVolume
from tests.fakes import fat

ENTRY = "loader/entries/basalt-2-b-0.2.0+3.conf"
FILES = {
    ENTRY: b"title Basalt 0.2.0 (B)\nlinux /EFI/basalt/B/vmlinuz\n",
    "loader/loader.conf": b"timeout 0\n",
    "EFI/basalt/B/vmlinuz": os.urandom(5000),
    "EFI/basalt/B/.initrd.img.k2Jx9a": os.urandom(1500),
    "EFI/BOOT/BOOTX64.EFI": b"MZ" * 700,
}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return fat.make_image(tmp_path / "esp.img", FILES)


def _fat_bytes(image: Path) -> bytes:
    with FatVolume.open(image) as volume:
        g = volume.geometry
    with open(image, "rb") as handle:
        handle.seek(g.fat_offset)
        return handle.read(g.fat_bytes)


def test_walk_lists_every_file_with_its_content_and_a_whole_chain(image: Path) -> None:
    with FatVolume.open(image) as volume:
        files = {f.path: f for f in volume.walk() if not f.is_dir}
        assert {p: volume.read(f) for p, f in files.items()} == FILES
        assert all(volume.chain(f).problem is None for f in files.values())
        cluster = volume.geometry.cluster
        kernel = files["EFI/basalt/B/vmlinuz"]
        chain = volume.chain(kernel)
        assert chain.length == len(volume.clusters(kernel)) == -(-5000 // cluster)
        assert chain.end == volume.clusters(kernel)[-1]
        assert volume.lookup("efi/BASALT/b/VMLINUZ") == files["EFI/basalt/B/vmlinuz"]
        assert volume.lookup("loader/nothing") is None


def test_a_torn_rename_is_two_names_on_one_chain(image: Path) -> None:
    fat.second_name(image, ENTRY, "basalt-2-b-0.2.0+2-1.conf")
    with FatVolume.open(image) as volume:
        old = volume.lookup(ENTRY)
        new = volume.lookup("loader/entries/basalt-2-b-0.2.0+2-1.conf")
        assert old is not None and new is not None
        assert volume.clusters(old) == volume.clusters(new)
        assert volume.chain(old) == volume.chain(new) and volume.chain(old).problem is None
    code, said = fat.fsck(image)
    assert code == 1 and "share clusters" in said


def test_erase_removes_the_name_and_frees_nothing(image: Path) -> None:
    fat.second_name(image, ENTRY, "basalt-2-b-0.2.0+2-1.conf")
    before = _fat_bytes(image)
    with FatVolume.open(image, writable=True) as volume:
        second = volume.lookup("loader/entries/basalt-2-b-0.2.0+2-1.conf")
        assert second is not None and second.name_slots  # a long name: slots to mark too
        volume.erase(second)
    assert _fat_bytes(image) == before
    assert fat.listing(image, "loader/entries") == ["basalt-2-b-0.2.0+3.conf"]
    assert fat.read(image, ENTRY) == FILES[ENTRY]
    code, said = fat.fsck(image)
    assert code == 0, said


def test_a_cut_inside_erase_leaves_only_long_name_slots_readers_skip(image: Path) -> None:
    """The short entry's sector is written first: once it is, the name is gone."""
    with FatVolume.open(image) as volume:
        temp = volume.lookup("EFI/basalt/B/.initrd.img.k2Jx9a")
        assert temp is not None and temp.name_slots
    with open(image, "r+b") as handle:  # only the first of erase's writes reached the disk
        handle.seek(temp.entry_offset)
        handle.write(b"\xe5")
    assert fat.listing(image, "EFI/basalt/B") == ["vmlinuz"]
    with FatVolume.open(image) as volume:
        assert volume.read(volume.lookup("EFI/basalt/B/vmlinuz")) == FILES["EFI/basalt/B/vmlinuz"]  # type: ignore[arg-type]


def test_a_name_whose_clusters_were_freed_has_a_problem(image: Path) -> None:
    fat.freed(image, "EFI/basalt/B/vmlinuz")
    with FatVolume.open(image) as volume:
        kernel = volume.lookup("EFI/basalt/B/vmlinuz")
        assert kernel is not None
        problem = volume.chain(kernel).problem
    assert problem is not None and problem.endswith("is marked free in the FAT")
    code, said = fat.fsck(image)
    assert code == 1 and "free cluster" in said


def test_an_empty_name_owns_no_cluster(image: Path) -> None:
    fat.empty_name(image, "loader/entries/basalt-2-b-0.2.0.conf")
    with FatVolume.open(image) as volume:
        empty = volume.lookup("loader/entries/basalt-2-b-0.2.0.conf")
        assert empty is not None and (empty.size, empty.start) == (0, 0)
        assert volume.chain(empty) == Chain(0, 0, None)


def test_erase_refuses_an_entry_that_changed_since_it_was_read(image: Path) -> None:
    with FatVolume.open(image) as volume:
        stale = volume.lookup(ENTRY)
    assert stale is not None
    fat.put(image, ENTRY, b"rewritten in between, on other clusters\n")
    with FatVolume.open(image, writable=True) as volume, pytest.raises(FatError, match="changed"):
        volume.erase(stale)


def test_fat16_is_read_too(tmp_path: Path) -> None:
    fat.require_tools()
    image = tmp_path / "fat16.img"
    with open(image, "wb") as handle:
        handle.truncate(16 << 20)
    import subprocess

    subprocess.run(["mkfs.fat", "-F", "16", str(image)], check=True, capture_output=True)
    fat.put(image, "loader/entries/basalt-1-a-0.1.0.conf", b"linux /x\n")
    with FatVolume.open(image) as volume:
        assert not volume.geometry.fat32
        (found,) = [f for f in volume.walk() if not f.is_dir]
        assert volume.read(found) == b"linux /x\n"


def test_what_is_not_fat_is_refused(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.write_bytes(bytes(1 << 20))
    with pytest.raises(FatError, match="no FAT boot sector"), FatVolume.open(blank):
        pass
    boot = bytearray(512)
    boot[510:512] = b"\x55\xaa"
    struct.pack_into("<HBHBHH", boot, 11, 512, 1, 32, 2, 0, 4000)
    struct.pack_into("<H", boot, 22, 4)
    blank.write_bytes(bytes(boot) + bytes(4000 * 512))
    with pytest.raises(FatError, match="FAT12"), FatVolume.open(blank):
        pass
    with pytest.raises(FatError, match="No such file"), FatVolume.open(tmp_path / "none"):
        pass
