"""Files on a mounted ESP (FAT): boot entries and each slot's kernel and initrd.

Layout (docs/adr/0011): ``/EFI/basalt/<SLOT>/{vmlinuz,initrd.img}`` and
``/loader/entries/basalt-GEN-SLOT-VERSION[+LEFT[-DONE]].conf``. Every write is atomic
and durable as far as FAT allows (:func:`basalt.machinery.fileio.replacing`): a temporary
file (``.NAME.XXXXXXXX``: systemd-boot skips names starting with a dot), written, fsynced,
renamed into place, and the directory fsynced. vfat has no file modes: none is set.
What a power cut in the middle of a FAT rename leaves is repaired at boot
(:mod:`.esp_repair`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from basalt.machinery.errors import BasaltError
from basalt.machinery.fileio import fsync_dir, replacing, write_atomic

from .entries import PREFIX, SUFFIX

ENTRIES = Path("loader/entries")
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"


class EspError(BasaltError):
    """The ESP does not hold what Basalt expects (an entry to copy options from, a file)."""


def slot_dir(slot: str) -> Path:
    """``EFI/basalt/B`` for slot ``b``: where the slot's kernel and initrd live."""
    return Path("EFI/basalt") / slot.upper()


def entry_text(version: str, slot: str, cmdline: str) -> str:
    """The loader entry of ``slot``: its kernel and initrd on the ESP, ``cmdline`` plus
    ``basalt.slot=``, which the initramfs uses to find the root by partition name."""
    where = "/" + slot_dir(slot).as_posix()
    return (
        f"title Basalt {version} ({slot.upper()})\n"
        f"version {version}\n"
        f"linux {where}/{KERNEL_NAME}\n"
        f"initrd {where}/{INITRD_NAME}\n"
        f"options {cmdline} basalt.slot={slot.upper()}\n"
    )


def _entry_fields(text: str) -> dict[str, str]:
    """An entry's ``key value`` lines, the first of each key."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        fields.setdefault(key, value.strip())
    return fields


def entry_options(text: str) -> str:
    """An entry's ``options`` without ``basalt.slot=`` (what a new slot's entry reuses)."""
    options = _entry_fields(text).get("options")
    if options is None:
        raise EspError("the boot entry has no options line", hint="restore it from the image")
    return " ".join(w for w in options.split() if not w.startswith("basalt.slot="))


def entry_boot(text: str) -> tuple[PurePosixPath, PurePosixPath | None, str]:
    """What an entry boots, as systemd-boot reads it: the ``linux`` and ``initrd`` paths
    (on the ESP, from its root) and the whole ``options`` line."""
    fields = _entry_fields(text)
    if not fields.get("linux"):
        raise EspError("the boot entry has no linux line", hint="restore it from the image")
    initrd = fields.get("initrd")
    return (
        PurePosixPath(fields["linux"].replace("\\", "/")),
        PurePosixPath(initrd.replace("\\", "/")) if initrd else None,
        fields.get("options", ""),
    )


class Esp:
    """A mounted ESP at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def entries_dir(self) -> Path:
        return self.root / ENTRIES

    def entries(self) -> list[str]:
        """Basalt's entry files (``basalt-*.conf``), sorted; other files are ignored."""
        try:
            names = os.listdir(self.entries_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(PREFIX) and n.endswith(SUFFIX))

    def read_entry(self, name: str) -> str:
        return (self.entries_dir / name).read_text(encoding="ascii", errors="replace")

    def write_entry(self, name: str, text: str) -> None:
        self.write_file(ENTRIES / name, text.encode("ascii"))

    def rename_entry(self, old: str, new: str) -> None:
        os.rename(self.entries_dir / old, self.entries_dir / new)
        fsync_dir(self.entries_dir)

    def remove_entry(self, name: str) -> None:
        self.remove(ENTRIES / name)

    def remove(self, relative: str | Path) -> None:
        """Unlink a file (freeing its clusters) and make that durable."""
        path = self.root / relative
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fsync_dir(path.parent)

    def write_file(self, relative: Path, data: bytes) -> None:
        """Replace ``relative`` with ``data``, whole or not at all."""
        write_atomic(self.root / relative, data, mode=None)

    def replacing(self, target: Path) -> contextlib.AbstractContextManager[BinaryIO]:
        """Write ``target`` through a temporary file; it is renamed into place (and the
        directory synced) only when the block ends without an exception."""
        return replacing(target, mode=None)

    def path(self, on_esp: PurePosixPath) -> Path:
        """Where a path named from the ESP's root (``/EFI/basalt/B/vmlinuz``) is mounted."""
        parts = [p for p in on_esp.parts if p not in ("/", ".", "..")]
        return self.root.joinpath(*parts)

    def slot_files(self, slot: str) -> list[Path]:
        """The slot's kernel and initrd paths on the ESP."""
        return [self.root / slot_dir(slot) / n for n in (KERNEL_NAME, INITRD_NAME)]

    def missing_files(self, slot: str) -> list[str]:
        files = self.slot_files(slot)
        return ["/" + p.relative_to(self.root).as_posix() for p in files if not p.is_file()]
