"""The ``disk`` stage: a GPT disk image that boots under UEFI through systemd-boot.

Layout (docs/adr/0011-disk-layout.md): ``EFI`` (FAT32 ESP), ``BASALT-A`` (the squashfs
root, raw), ``BASALT-B`` (empty), ``META`` (zeros); install adds STATE and EPHEMERAL.

The ESP holds Debian's ``systemd-bootx64.efi`` as ``/EFI/BOOT/BOOTX64.EFI`` (the
removable-media path: no NVRAM entry needed), slot A's ``/EFI/basalt/A/vmlinuz``,
``initrd.img`` and ``chunks.json`` (the slot's chunk index), ``loader/loader.conf``
(no ``default`` line: the first entry in systemd-boot's order boots, which is what A/B
boot counting relies on) and one entry,
named as :mod:`basalt.machinery.boot.entries` names them. It is made on the host with
``mkfs.fat --invariant`` and ``mcopy -m`` from a tree whose every timestamp is
SOURCE_DATE_EPOCH, and the GPT's GUIDs derive from the stage id: two builds of one image
are byte for byte equal. ``disk.raw`` is sparse; ``disk.qcow2`` is the same disk as
plain (uncompressed) qcow2, for provisioners that give each VM a copy-on-write overlay.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from basalt.machinery.boot.entries import BasaltEntry
from basalt.machinery.boot.esp import entry_text
from basalt.machinery.disk import gpt
from basalt.machinery.disk.layout import EFI, LAYOUT, slot_partition
from basalt.machinery.images.chunks import index_files
from basalt.machinery.images.payload import CHUNKS_NAME, INITRAMFS, KERNEL, ROOTFS

from .boot import Boot
from .errors import ImageBuildError
from .packages import Unpack
from .squashfs import SOURCE_DATE_EPOCH, Squashfs
from .stage import Cache, Stage, run_tool

SYSTEMD_BOOT = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
LOADER_CONF = "timeout 0\neditor no\nauto-entries no\nauto-firmware no\n"
#: disk.raw.zst is disk.raw for download (the factory serves it; ``zstd -d`` or
#: ``zstdcat | dd`` writes it to a disk), compressed single-threaded: reproducible.
DISK_FILES = ("disk.raw", "disk.qcow2", "disk.raw.zst")
#: The install generation of the image's own entry (entries.py: GEN grows with installs).
FIRST_GENERATION = 1


def esp_tree(
    staging: Path, bootloader: Path, boot_dir: Path, root: Path, version: str, cmdline: str
) -> str:
    """Fill ``staging`` with the ESP's files; return the entry's file name. Slot A's chunk
    index (what an upgrade's upload may leave out, docs/adr/0026) describes the kernel,
    the initrd and ``root``, as a bundle of them would."""
    entry = BasaltEntry(FIRST_GENERATION, "a", version).filename
    (staging / "EFI/BOOT").mkdir(parents=True)
    (staging / "EFI/basalt/A").mkdir(parents=True)
    (staging / "loader/entries").mkdir(parents=True)
    shutil.copyfile(bootloader, staging / "EFI/BOOT/BOOTX64.EFI")
    for name in ("vmlinuz", "initrd.img"):
        shutil.copyfile(boot_dir / name, staging / "EFI/basalt/A" / name)
    payload = {KERNEL: boot_dir / "vmlinuz", INITRAMFS: boot_dir / "initrd.img", ROOTFS: root}
    index, _ = index_files(payload)
    (staging / "EFI/basalt/A" / CHUNKS_NAME).write_bytes(index.encode())
    (staging / "loader/loader.conf").write_text(LOADER_CONF)
    (staging / "loader/entries" / entry).write_text(entry_text(version, "A", cmdline))
    for path in [staging, *staging.rglob("*")]:
        os.utime(path, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH), follow_symlinks=False)
    return entry


def make_esp(staging: Path, image: Path, size: int) -> None:
    """A FAT32 filesystem of ``size`` bytes in ``image`` holding ``staging``'s tree."""
    run_tool(
        ["mkfs.fat", "-F", "32", "-n", "EFI", "--invariant", "-C", str(image), str(size // 1024)],
        what="mkfs.fat (ESP)",
    )
    tops = [str(p) for p in sorted(staging.iterdir())]
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}
    run_tool(["mcopy", "-i", str(image), "-s", "-m", "-Q", *tops, "::/"], what="mcopy", env=env)


def _copy_into(source: Path, fd: int, offset: int) -> None:
    with source.open("rb") as stream:
        while block := stream.read(1 << 20):
            os.pwrite(fd, block, offset)
            offset += len(block)


@dataclass(frozen=True)
class Disk(Stage):
    """``disk.raw``, ``disk.qcow2``, ``disk.raw.zst`` and ``disk.json`` (partitions, entry)."""

    name = "disk"
    version = 3  # 2: disk.raw.zst; 3: slot A's chunks.json
    boot: Boot
    squashfs: Squashfs
    unpack: Unpack
    basalt_version: str
    cmdline: str

    def run(self, out: Path, cache: Cache) -> None:
        bootloader = cache.output(self.unpack) / "tree" / SYSTEMD_BOOT
        if not bootloader.exists():
            raise ImageBuildError(
                f"{SYSTEMD_BOOT} is not in the unpacked packages",
                hint="image.lock must hold systemd-boot-efi",
            )
        root = cache.output(self.squashfs) / "root.sqfs"
        table = LAYOUT.image_table(self.stage_id())
        efi = table.find(EFI)
        slot_a = table.find(slot_partition("A"))
        assert efi is not None and slot_a is not None
        if root.stat().st_size > slot_a.size:
            raise ImageBuildError(
                f"root.sqfs is {root.stat().st_size} bytes; a slot holds {slot_a.size}",
                hint="raise Layout.slot in basalt/machinery/disk/layout.py (and the ADR)",
            )
        staging = out / "esp"
        entry = esp_tree(
            staging, bootloader, cache.output(self.boot), root, self.basalt_version, self.cmdline
        )
        esp = out / "esp.img"
        make_esp(staging, esp, efi.size)
        shutil.rmtree(staging)
        raw = out / "disk.raw"
        fd = os.open(raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, table.sectors * gpt.SECTOR)  # sparse: B, META and gaps stay holes
            _copy_into(esp, fd, efi.offset)
            _copy_into(root, fd, slot_a.offset)
            gpt.write(fd, table, sync=False)
        finally:
            os.close(fd)
        esp.unlink()
        run_tool(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out / "disk.qcow2")],
            what="qemu-img convert",
        )
        run_tool(
            ["zstd", "-q", "-T1", "-10", str(raw), "-o", str(out / "disk.raw.zst")],
            what="zstd (disk.raw.zst)",
        )
        info = {
            "entry": entry,
            "partitions": [
                {"name": p.name, "offset": p.offset, "bytes": p.size} for p in table.partitions
            ],
        }
        (out / "disk.json").write_text(json.dumps(info, indent=2) + "\n")
