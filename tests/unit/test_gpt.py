"""GPT read/write: round trips, the backup copy, and an independent reader (sgdisk)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from basalt.machinery.disk import gpt
from basalt.machinery.disk.layout import LAYOUT, Layout

MIB = 1024 * 1024


def _sgdisk(option: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sgdisk", option, str(path)], capture_output=True, text=True, check=False
    )


def _disk(path: Path, size: int) -> int:
    with path.open("wb") as stream:
        stream.truncate(size)
    return os.open(path, os.O_RDWR)


def test_image_table_round_trip(tmp_path: Path) -> None:
    table = LAYOUT.image_table("seed")
    fd = _disk(tmp_path / "disk", LAYOUT.image_size)
    try:
        gpt.write(fd, table)
        back = gpt.read(fd)
    finally:
        os.close(fd)
    assert back == table
    assert [p.name for p in back.partitions] == ["EFI", "BASALT-A", "BASALT-B", "META"]
    assert back.find("EFI") is not None and back.find("EFI").type_guid == gpt.ESP_TYPE  # type: ignore[union-attr]
    assert back.partitions[0].first_lba == 2048
    assert back.index("BASALT-A") == 2


def test_same_seed_same_bytes() -> None:
    assert gpt.encode(LAYOUT.image_table("x")) == gpt.encode(LAYOUT.image_table("x"))
    assert gpt.encode(LAYOUT.image_table("x")) != gpt.encode(LAYOUT.image_table("y"))


def test_damaged_primary_falls_back_to_backup(tmp_path: Path) -> None:
    table = LAYOUT.image_table("seed")
    fd = _disk(tmp_path / "disk", LAYOUT.image_size)
    try:
        gpt.write(fd, table)
        os.pwrite(fd, b"\xff" * 16, 2 * 512)  # the first entry: the entries CRC fails
        back = gpt.read(fd)
        assert back.from_backup and back == table
        os.pwrite(fd, b"\xff" * 16, LAYOUT.image_size - 33 * 512)
        with pytest.raises(gpt.GptError, match="no valid GPT"):
            gpt.read(fd)
    finally:
        os.close(fd)


def test_blank_disk_has_no_table(tmp_path: Path) -> None:
    fd = _disk(tmp_path / "disk", 8 * MIB)
    try:
        assert not gpt.has_signature(fd)
        with pytest.raises(gpt.GptError, match="no valid GPT"):
            gpt.read(fd)
    finally:
        os.close(fd)


def test_installed_table_on_a_bigger_disk(tmp_path: Path) -> None:
    size = 2048 * MIB
    image = LAYOUT.image_table("seed")
    fd = _disk(tmp_path / "disk", size)
    try:
        installed = LAYOUT.installed_table(image, size // 512)
        gpt.write(fd, installed)
        back = gpt.read(fd)
    finally:
        os.close(fd)
    assert back == installed
    state, ephemeral = back.find("STATE"), back.find("EPHEMERAL")
    assert state is not None and ephemeral is not None
    assert state.size == LAYOUT.state and state.offset == LAYOUT.image_size - MIB
    assert ephemeral.end == size - MIB  # the rest, ending on a MiB before the backup table
    assert back.partitions[:4] == image.partitions


def test_too_small_and_overlaps_are_refused() -> None:
    image = LAYOUT.image_table("seed")
    with pytest.raises(gpt.GptError, match="does not fit"):
        LAYOUT.installed_table(image, (LAYOUT.image_size + 50 * MIB) // 512)
    part = image.partitions[0]
    bad = gpt.Table(image.disk_guid, image.sectors, (part, part))
    with pytest.raises(gpt.GptError, match="overlap"):
        gpt.encode(bad)
    with pytest.raises(gpt.GptError, match="longer"):
        gpt.encode(gpt.Table(image.disk_guid, image.sectors, (
            gpt.Partition("X" * 37, gpt.LINUX_DATA_TYPE, uuid.uuid4(), 2048, 4095),
        )))  # fmt: skip


def test_write_refuses_a_table_for_another_size(tmp_path: Path) -> None:
    fd = _disk(tmp_path / "disk", 64 * MIB)
    try:
        with pytest.raises(gpt.GptError, match="but the disk has"):
            gpt.write(fd, Layout().image_table("seed"))
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("sgdisk") is None, reason="sgdisk (gdisk) not installed")
def test_sgdisk_reads_what_we_write(tmp_path: Path) -> None:
    size = 2048 * MIB
    path = tmp_path / "disk"
    fd = _disk(path, size)
    try:
        table = LAYOUT.installed_table(LAYOUT.image_table("seed"), size // 512)
        gpt.write(fd, table)
    finally:
        os.close(fd)
    verify = _sgdisk("--verify", path)
    assert verify.returncode == 0 and "No problems found" in verify.stdout, verify.stdout
    listing = _sgdisk("--print", path)
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.splitlines() if line[:4].strip().isdigit()]
    got = [(int(r[0]), int(r[1]), int(r[2]), r[5], r[-1]) for r in rows]
    want = [
        (n, p.first_lba, p.last_lba, "EF00" if p.type_guid == gpt.ESP_TYPE else "8300", p.name)
        for n, p in enumerate(table.partitions, start=1)
    ]
    assert got == want
    info = _sgdisk("--info=2", path)
    assert str(table.partitions[1].guid).upper() in info.stdout
    disk = _sgdisk("--print", path)
    assert str(table.disk_guid).upper() in disk.stdout
