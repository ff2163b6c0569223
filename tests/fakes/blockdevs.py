"""A fake sysfs and procfs for block devices, laid out as the kernel lays them out:
``sys/devices/.../block/<disk>/<partition>`` with ``dev``, ``size`` (512-byte sectors),
``ro``, ``uevent``, ``holders/`` (and ``partition`` on partitions, ``loop/backing_file``
on attached loop devices); ``sys/block/<disk>`` and ``sys/class/block/<name>`` as
symlinks into it; ``proc/self/mountinfo``, ``proc/swaps`` and ``proc/cmdline``. What
reads the real files (basalt.machined.storage.wipe, storage.partitions) reads these."""

from __future__ import annotations

import os
from pathlib import Path

MIB = 1 << 20


class BlockTree:
    """A root holding ``sys`` and ``proc`` for the block devices added to it."""

    def __init__(self, root: Path, cmdline: str = "console=ttyS0") -> None:
        self.root = root
        self.devices = root / "sys" / "devices" / "pci0000:00"
        for directory in (
            self.devices,
            root / "sys" / "block",
            root / "sys" / "class" / "block",
            root / "proc" / "self",
        ):
            directory.mkdir(parents=True, exist_ok=True)
        self._mountinfo: list[str] = []
        self._swaps: list[str] = []
        self._minor = 0
        self.cmdline(cmdline)
        self._write_proc()

    def cmdline(self, text: str) -> None:
        (self.root / "proc" / "cmdline").write_text(text + "\n")

    def _node(self, where: Path, name: str, size_mib: int, ro: bool, uevent: dict[str, str]) -> str:
        where.mkdir(parents=True)
        dev = f"252:{self._minor}"
        self._minor += 1
        (where / "dev").write_text(dev + "\n")
        (where / "size").write_text(f"{size_mib * MIB // 512}\n")
        (where / "ro").write_text("1\n" if ro else "0\n")
        (where / "holders").mkdir()
        lines = ["MAJOR=252", f"MINOR={dev.split(':')[1]}", f"DEVNAME={name}"]
        lines += [f"{k}={v}" for k, v in uevent.items()]
        (where / "uevent").write_text("\n".join(lines) + "\n")
        os.symlink(os.path.relpath(where, self.root / "sys" / "class" / "block"),
                   self.root / "sys" / "class" / "block" / name)  # fmt: skip
        return dev

    def disk(self, name: str, size_mib: int = 1024, *, ro: bool = False) -> Path:
        where = self.devices / f"virtio-{name}" / "block" / name
        self._node(where, name, size_mib, ro, {"DEVTYPE": "disk"})
        os.symlink(os.path.relpath(where, self.root / "sys" / "block"),
                   self.root / "sys" / "block" / name)  # fmt: skip
        return where

    def partition(
        self, disk: str, number: int, partname: str | None = None, size_mib: int = 100
    ) -> str:
        name = f"{disk}p{number}" if disk[-1].isdigit() else f"{disk}{number}"
        where = (self.root / "sys" / "block" / disk).resolve() / name
        uevent = {"DEVTYPE": "partition", "PARTN": str(number)}
        if partname is not None:
            uevent["PARTNAME"] = partname
        self._node(where, name, size_mib, False, uevent)
        (where / "partition").write_text(f"{number}\n")
        return name

    def loop(self, name: str, backing: str | None, size_mib: int = 64) -> None:
        where = self.disk(name, size_mib if backing else 0)
        if backing is not None:
            (where / "loop").mkdir()
            (where / "loop" / "backing_file").write_text(backing + "\n")

    def hold(self, name: str, holder: str) -> None:
        (self.root / "sys" / "class" / "block" / name / "holders" / holder).mkdir()

    def mount(self, name: str, target: str) -> None:
        dev = (self.root / "sys" / "class" / "block" / name / "dev").read_text().strip()
        n = len(self._mountinfo) + 30
        self._mountinfo.append(f"{n} 1 {dev} / {target} rw,relatime - ext4 /dev/{name} rw")
        self._write_proc()

    def swap(self, name: str) -> None:
        self._swaps.append(f"/dev/{name}  partition\t1048572\t0\t-2")
        self._write_proc()

    def _write_proc(self) -> None:
        base = ["1 0 0:20 / / ro,relatime - squashfs /dev/root ro"]
        (self.root / "proc" / "self" / "mountinfo").write_text(
            "\n".join(base + self._mountinfo) + "\n"
        )
        header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority"
        (self.root / "proc" / "swaps").write_text("\n".join([header, *self._swaps]) + "\n")


def basalt_node(root: Path, slot: str = "A") -> BlockTree:
    """A metal node booted from slot ``slot`` of its disk vda (EFI, BASALT-A/B, META,
    STATE, EPHEMERAL; the last two mounted), with a blank second disk vdb."""
    tree = BlockTree(root, f"console=ttyS0 basalt.slot={slot}")
    tree.disk("vda", 4096)
    names = ["EFI", "BASALT-A", "BASALT-B", "META", "STATE", "EPHEMERAL"]
    parts = {name: tree.partition("vda", n, name) for n, name in enumerate(names, start=1)}
    tree.mount(parts["STATE"], "/system/state")
    tree.mount(parts["EPHEMERAL"], "/var")
    tree.disk("vdb", 256)
    return tree
