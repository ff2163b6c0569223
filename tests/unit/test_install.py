"""Install to disk, on image files: the checks (nothing written on a bad disk), both
install cases with real mke2fs (debugfs and e2fsck read the result), the commit order,
finding the boot disk and partitions by name, and basalt.config= fetching."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from basalt.imager import init as initramfs
from basalt.machined import apply, config_url, install
from basalt.machined.storage import partitions
from basalt.machinery.disk import gpt
from basalt.machinery.disk.layout import Layout

MIB = 1 << 20
#: The real layout's shape at a tenth of its size, so that copies and mke2fs stay fast.
LAYOUT = Layout(efi=8 * MIB, slot=16 * MIB, state=16 * MIB, min_ephemeral=32 * MIB)
DISK = 160 * MIB
CONFIG = "version: v1alpha1\nkind: MachineConfig\n# test\n"
needs_e2fs = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("debugfs", "e2fsck")) or not Path(install.MKE2FS).exists(),
    reason="e2fsprogs not installed",
)


def _image(path: Path, size: int = LAYOUT.image_size) -> gpt.Table:
    """A disk image as the imager makes it, with recognisable EFI and BASALT-A bytes."""
    table = LAYOUT.image_table("test")
    with path.open("wb") as stream:
        stream.truncate(size)
    fd = os.open(path, os.O_RDWR)
    try:
        for name in ("EFI", "BASALT-A"):
            part = table.find(name)
            assert part is not None
            os.pwrite(fd, (name.encode() * 1000)[: 2 * MIB], part.offset)
        gpt.write(fd, table.resized(size // 512))
    finally:
        os.close(fd)
    return table


def _blank(path: Path, size: int = DISK) -> Path:
    with path.open("wb") as stream:
        stream.truncate(size)
    return path


def _read_table(path: Path) -> gpt.Table:
    fd = os.open(path, os.O_RDONLY)
    try:
        return gpt.read(fd)
    finally:
        os.close(fd)


def _digest(path: Path, part: gpt.Partition) -> str:
    with path.open("rb") as stream:
        stream.seek(part.offset)
        return hashlib.sha256(stream.read(part.size)).hexdigest()


def _ends(path: Path) -> bytes:
    """The first and the last 4 MiB of a disk: both tables and the start of EFI."""
    with path.open("rb") as stream:
        head = stream.read(4 * MIB)
        stream.seek(-4 * MIB, os.SEEK_END)
        return head + stream.read()


def _plan(disk: Path | str | None, source: Path, wipe: bool = False) -> install.Plan:
    target = str(disk) if disk is not None else None
    return install.plan_install(target, wipe, str(source), layout=LAYOUT, block_devices_only=False)


# -- refusals ---------------------------------------------------------------------------------


def test_refusals_name_the_field_and_change_nothing(tmp_path: Path) -> None:
    boot = tmp_path / "boot.img"
    _image(boot, DISK)
    before = _ends(boot)
    cases = [
        (None, "MachineConfig.install.disk is not set"),
        (tmp_path / "vdz", "MachineConfig.install.disk: .*vdz does not exist on this node"),
        (_blank(tmp_path / "small", 64 * MIB), "has 64 MiB; Basalt needs at least 91 MiB"),
    ]
    for disk, message in cases:
        with pytest.raises(install.InstallError, match=message) as caught:
            _plan(disk, boot)
        assert caught.value.hint
    other = tmp_path / "other"
    _image(other, DISK)
    with pytest.raises(install.InstallError, match="is not blank: it holds a partition table"):
        _plan(other, boot)
    with pytest.raises(install.InstallError, match=r"boot disk .* has no Basalt layout"):
        _plan(boot, _blank(tmp_path / "plain"))
    assert _ends(boot) == before


def test_block_devices_only_by_default(tmp_path: Path) -> None:
    boot = tmp_path / "boot.img"
    _image(boot, DISK)
    with pytest.raises(install.InstallError, match="is not a block device"):
        install.plan_install(str(boot), False, str(boot))


# -- installs ---------------------------------------------------------------------------------


def _debugfs(path: Path, part: gpt.Partition, command: str) -> str:
    done = subprocess.run(
        ["debugfs", "-R", command, f"{path}?offset={part.offset}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def _fsck(path: Path, part: gpt.Partition, tmp_path: Path) -> None:
    """e2fsck (read-only, forced) of the partition, copied out to a file."""
    copy = tmp_path / f"{part.name}.fs"
    with path.open("rb") as source, copy.open("wb") as out:
        source.seek(part.offset)
        out.write(source.read(part.size))
    done = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_e2fs
def test_install_to_the_boot_disk_adds_state_and_ephemeral(tmp_path: Path) -> None:
    disk = tmp_path / "vda"
    image = _image(disk, DISK)  # a qcow2 bigger than the image: backup table mid-disk
    efi = image.find("EFI")
    assert efi is not None
    efi_before = _digest(disk, efi)
    plan = _plan(disk, disk)
    assert plan.same_disk
    install.execute(plan, CONFIG, tmp_path)
    table = _read_table(disk)
    assert not table.from_backup and table.sectors == DISK // 512
    assert [p.name for p in table.partitions] == [
        "EFI", "BASALT-A", "BASALT-B", "META", "STATE", "EPHEMERAL",
    ]  # fmt: skip
    assert table.partitions[:4] == image.partitions  # the booted slot did not move
    assert _digest(disk, efi) == efi_before
    state, ephemeral = table.find("STATE"), table.find("EPHEMERAL")
    assert state is not None and ephemeral is not None
    assert _debugfs(disk, state, "cat /config.yaml") == CONFIG
    assert "STATE" in _debugfs(disk, state, "stats")
    assert "EPHEMERAL" in _debugfs(disk, ephemeral, "stats")
    _fsck(disk, state, tmp_path)
    _fsck(disk, ephemeral, tmp_path)
    with pytest.raises(install.InstallError, match="installed already"):
        _plan(disk, disk)
    assert _plan(disk, disk, wipe=True).table.find("STATE") is not None


@needs_e2fs
def test_install_to_another_blank_disk_copies_the_image(tmp_path: Path) -> None:
    boot, target = tmp_path / "usb", _blank(tmp_path / "vdb")
    image = _image(boot)
    plan = _plan(target, boot)
    assert not plan.same_disk
    install.execute(plan, CONFIG, tmp_path)
    table = _read_table(target)
    assert [p.name for p in table.partitions][:4] == ["EFI", "BASALT-A", "BASALT-B", "META"]
    assert table.disk_guid != image.disk_guid
    for old, new in zip(image.partitions, table.partitions, strict=False):
        assert (old.first_lba, old.last_lba) == (new.first_lba, new.last_lba)
        assert old.guid != new.guid
        if old.name in ("EFI", "BASALT-A"):
            assert _digest(boot, old) == _digest(target, new)
    state = table.find("STATE")
    assert state is not None and _debugfs(target, state, "cat /config.yaml") == CONFIG


@needs_e2fs
def test_a_failed_install_leaves_the_table_as_it_was(tmp_path: Path) -> None:
    disk = tmp_path / "vda"
    image = _image(disk, DISK)
    plan = _plan(disk, disk)
    with pytest.raises(install.InstallError, match="cannot run"):
        install.execute(plan, CONFIG, tmp_path, mke2fs=str(tmp_path / "no-mke2fs"))
    assert _read_table(disk).partitions == image.partitions
    assert list(tmp_path.glob("install-*")) == []


# -- finding disks ----------------------------------------------------------------------------


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """/sys/class/block of a machine with vda (EFI, BASALT-A, STATE) and vdb (blank)."""
    devices = tmp_path / "devices"
    block = tmp_path / "class_block"
    block.mkdir()
    parts = {"vda": ["EFI", "BASALT-A", "STATE"], "vdb": []}
    for disk, names in parts.items():
        (devices / disk).mkdir(parents=True)
        (devices / disk / "uevent").write_text(f"DEVNAME={disk}\nDEVTYPE=disk\n")
        (block / disk).symlink_to(devices / disk)
        for number, name in enumerate(names, start=1):
            part = devices / disk / f"{disk}{number}"
            part.mkdir()
            (part / "uevent").write_text(
                f"DEVNAME={disk}{number}\nDEVTYPE=partition\nPARTN={number}\nPARTNAME={name}\n"
            )
            (block / part.name).symlink_to(part)
    return block


def test_boot_disk_and_partitions_by_name(sysfs: Path, tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 basalt.slot=A\n")
    assert partitions.boot_disk(sysfs, cmdline) == "/dev/vda"
    assert partitions.find_partition("STATE", sysfs) == "/dev/vda3"
    assert partitions.installed_devices(sysfs) == ("/dev/vda3", None)
    assert initramfs.partition_by_name("BASALT-A", str(sysfs)) == "/dev/vda2"
    assert initramfs.partition_by_name("BASALT-B", str(sysfs)) is None
    cmdline.write_text("console=ttyS0 basalt.slot=B\n")
    assert partitions.boot_disk(sysfs, cmdline) is None
    cmdline.write_text("console=ttyS0\n")  # a direct-kernel boot: nothing to install from
    assert partitions.boot_disk(sysfs, cmdline) is None


def test_initramfs_finds_the_root_by_slot_or_device(tmp_path: Path) -> None:
    device = tmp_path / "vdb"
    device.touch()
    assert initramfs.find_root({"root": str(device)}, 1) == str(device)
    with pytest.raises(TimeoutError, match="BASALT-B"):
        initramfs.find_root({"root": "/dev/vda", "slot": "b"}, 0.05)


# -- basalt.config= -----------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = CONFIG.encode()
            self.send_response(200 if self.path == "/node.yaml" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_config_url_from_the_kernel_command_line(tmp_path: Path, server: str) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"quiet basalt.config={server}/node.yaml panic=-1\n")
    url = config_url.kernel_config_url(cmdline)
    assert url == f"{server}/node.yaml"
    assert apply.fetch_url(url) == CONFIG.encode()
    with pytest.raises(OSError, match="404"):
        apply.fetch_url(f"{server}/missing.yaml")
    with pytest.raises(apply.InvalidApplyError, match="only http"):
        apply.fetch_url("file:///etc/passwd")
    cmdline.write_text("quiet\n")
    assert config_url.kernel_config_url(cmdline) == ""


# -- install.extraKernelArgs ----------------------------------------------------------------------

ENTRY = (
    "title Basalt 0.1.0 (A)\nversion 0.1.0\nlinux /EFI/basalt/A/vmlinuz\n"
    "initrd /EFI/basalt/A/initrd.img\noptions console=ttyS0 quiet basalt.slot=A\n"
)


def test_extra_kernel_args_go_before_the_slot_once() -> None:
    from basalt.machined.boot.install_entries import EntryEditError, with_kernel_args

    args = ("console=tty0", "printk.devkmsg=on")
    edited = with_kernel_args(ENTRY, args)
    assert edited.splitlines()[-1] == (
        "options console=ttyS0 quiet console=tty0 printk.devkmsg=on basalt.slot=A"
    )
    assert edited.splitlines()[:-1] == ENTRY.splitlines()[:-1]
    assert with_kernel_args(edited, args) == edited  # an install run again adds nothing
    assert with_kernel_args(ENTRY, ()) == ENTRY
    with pytest.raises(EntryEditError, match="no options line"):
        with_kernel_args("title x\n", args)


def test_every_basalt_entry_on_the_esp_is_edited(tmp_path: Path) -> None:
    from basalt.machined.boot.install_entries import EntryEditError, edit_entries

    with pytest.raises(EntryEditError, match="no Basalt boot entry"):
        edit_entries(tmp_path, ("quiet",))
    entries = tmp_path / "loader" / "entries"
    entries.mkdir(parents=True)
    (entries / "basalt-1-a-0.1.0.conf").write_text(ENTRY)
    (entries / "other.conf").write_text("options untouched\n")
    assert edit_entries(tmp_path, ("net.ifnames=0",)) == ["basalt-1-a-0.1.0.conf"]
    text = (entries / "basalt-1-a-0.1.0.conf").read_text()
    assert "options console=ttyS0 quiet net.ifnames=0 basalt.slot=A\n" in text
    assert (entries / "other.conf").read_text() == "options untouched\n"
    assert sorted(p.name for p in entries.iterdir()) == ["basalt-1-a-0.1.0.conf", "other.conf"]


def test_the_plan_carries_the_extra_kernel_args(tmp_path: Path) -> None:
    disk = tmp_path / "vda"
    _image(disk, DISK)
    plan = install.plan_install(
        str(disk), False, str(disk), layout=LAYOUT, block_devices_only=False,
        kernel_args=("quiet",),
    )  # fmt: skip
    assert plan.kernel_args == ("quiet",)
