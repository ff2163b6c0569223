"""Which devices a node may wipe, decided from sysfs and procfs (fake trees laid out as
the kernel's, tests/fakes/blockdevs.py), and the wipe itself on files standing in for
devices (the ioctls a file does not support are skipped, as on a device without them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from basalt.machined.storage.wipe import (
    MIB,
    DiskInUseError,
    Host,
    UnknownDiskError,
    check_wipe,
    disks,
    lookup,
    refusals,
    wipe,
)
from basalt.machinery.errors import ErrorKind, InvalidRequestError
from tests.fakes.blockdevs import BlockTree, basalt_node


@pytest.fixture
def tree(tmp_path: Path) -> BlockTree:
    return basalt_node(tmp_path)


def _refused(text: str, tree: BlockTree) -> str:
    with pytest.raises(DiskInUseError) as caught:
        check_wipe(text, Host(tree.root))
    assert caught.value.kind is ErrorKind.FAILED_PRECONDITION
    return str(caught.value)


def test_a_blank_second_disk_may_be_wiped(tree: BlockTree) -> None:
    for name in ("vdb", "/dev/vdb"):
        device = check_wipe(name, Host(tree.root))
        assert (device.name, device.disk, device.partition) == ("vdb", "vdb", False)
        assert device.size == 256 * MIB


def test_the_system_disk_and_its_partitions_are_refused_with_the_reason(tree: BlockTree) -> None:
    message = _refused("/dev/vda", tree)
    assert "is the system disk: it holds the booted slot BASALT-A (vda2)" in message
    assert "vda5 is mounted on /system/state" in message
    assert "vda6 is mounted on /var" in message
    for part in ("vda3", "vda4"):  # BASALT-B and META: not mounted, on the system disk
        assert "a partition of vda, which is the system disk" in _refused(part, tree)


def test_the_system_disk_follows_the_booted_slot(tmp_path: Path) -> None:
    tree = basalt_node(tmp_path, slot="B")
    assert "booted slot BASALT-B (vda3)" in _refused("vda", tree)


def test_without_a_booted_slot_only_what_is_in_use_is_refused(tmp_path: Path) -> None:
    tree = BlockTree(tmp_path)  # a direct-kernel boot: no basalt.slot=
    tree.disk("vda", 2048)
    tree.partition("vda", 1, "EFI")
    assert check_wipe("vda", Host(tree.root)).name == "vda"


def test_a_disk_with_a_mounted_partition_and_its_other_partitions_are_refused(
    tree: BlockTree,
) -> None:
    tree.disk("vdc", 512)
    data = tree.partition("vdc", 1)
    spare = tree.partition("vdc", 2)
    tree.mount(data, "/var/mnt/data")
    assert "vdc1 is mounted on /var/mnt/data" in _refused("vdc", tree)
    assert "vdc1 is mounted on /var/mnt/data" in _refused(spare, tree)


def test_holders_swap_loops_and_read_only_devices_are_refused(tree: BlockTree) -> None:
    tree.disk("vdc", 512)
    tree.hold(tree.partition("vdc", 1), "dm-0")
    assert "vdc1 is held by dm-0 (device mapper or md)" in _refused("vdc", tree)
    tree.disk("vdd", 512)
    tree.swap(tree.partition("vdd", 1))
    assert "vdd1 is in use as swap" in _refused("vdd", tree)
    tree.loop("loop0", "/var/lib/images/a.img")
    assert "loop0 is a loop device attached to /var/lib/images/a.img" in _refused("loop0", tree)
    tree.disk("sr0", 700, ro=True)
    assert "sr0 is read-only" in _refused("sr0", tree)
    tree.loop("loop1", None)
    assert "loop1 has no medium (size 0)" in _refused("loop1", tree)


def test_every_reason_is_named_at_once(tree: BlockTree) -> None:
    tree.disk("vdc", 512, ro=True)
    tree.hold("vdc", "md127")
    tree.swap("vdc")
    message = _refused("vdc", tree)
    assert "held by md127" in message and "swap" in message and "read-only" in message
    assert len(refusals(lookup("vdc", Host(tree.root)), Host(tree.root))) == 3


def test_an_unknown_device_is_not_found_and_the_disks_are_listed(tree: BlockTree) -> None:
    tree.loop("loop3", None)  # no medium: not listed
    with pytest.raises(UnknownDiskError) as caught:
        check_wipe("sdz", Host(tree.root))
    assert caught.value.kind is ErrorKind.NOT_FOUND
    assert "no block device 'sdz' on this node (disks: vda (4.0 GiB), vdb (256.0 MiB))" in str(
        caught.value
    )
    assert [d.name for d in disks(Host(tree.root))] == ["vda", "vdb"]


@pytest.mark.parametrize("text", ["", "/dev/", "../vda", "/dev/../sda", "/etc/passwd", ".."])
def test_names_that_are_not_device_names_are_invalid(tree: BlockTree, text: str) -> None:
    with pytest.raises(InvalidRequestError, match="is not a block device name"):
        check_wipe(text, Host(tree.root))


def _device_file(path: Path, size: int) -> Path:
    with path.open("wb") as handle:
        handle.write(b"\xaa" * size)
    return path


def test_fast_zeroes_the_first_and_last_mib_only(tmp_path: Path) -> None:
    device = _device_file(tmp_path / "disk", 5 * MIB)
    result = wipe(device, "fast", whole_disk=True)
    data = device.read_bytes()
    assert data[:MIB] == bytes(MIB) and data[-MIB:] == bytes(MIB)
    assert data[MIB:-MIB] == b"\xaa" * (3 * MIB)
    assert (result.size, result.discarded, result.reread) == (5 * MIB, False, False)
    assert "first and last MiB zeroed" in result.summary("vdb")


def test_fast_on_a_device_smaller_than_two_mib(tmp_path: Path) -> None:
    device = _device_file(tmp_path / "small", 1536 * 1024)
    wipe(device, "fast", whole_disk=False)
    assert device.read_bytes() == bytes(1536 * 1024)


def test_zeroes_writes_the_whole_device_and_reports_progress(tmp_path: Path) -> None:
    device = _device_file(tmp_path / "disk", 9 * MIB + 4096)
    seen: list[tuple[int, int]] = []
    result = wipe(device, "zeroes", whole_disk=True, progress=lambda d, t: seen.append((d, t)))
    assert device.read_bytes() == bytes(9 * MIB + 4096)
    assert seen[-1] == (9 * MIB + 4096, 9 * MIB + 4096) and len(seen) == 3
    assert "zeroed whole" in result.summary("vdb")
