"""``install.extraKernelArgs``: written into the installed disk's boot entries.

The image's boot entry (``loader/entries/basalt-*.conf`` on the ESP) passes the image's
command line and ``basalt.slot=``. At install, before the new partition table is
written (the commit point, :func:`basalt.machined.install.execute`), each Basalt entry
on the target's ESP gets the config's extra arguments appended to its ``options``: after
the image's own (for an argument the kernel reads once, the last one wins), before
``basalt.slot=``. An entry is replaced whole (written, synced, renamed), so a power cut
leaves the old entry or the new one; running the edit again changes nothing.

The ESP is mounted (vfat) for the edit only: on the boot disk through its partition
device (a second mount of one device shares one filesystem with any other mount of it);
on another disk, whose new partitions the kernel does not know yet, through a loop
device over the target disk at the ESP's offset.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from basalt.machinery.errors import BasaltError
from basalt.machinery.fileio import write_atomic

ENTRIES = Path("loader/entries")
#: systemd-boot's entry names are ASCII; code page 437 for the 8.3 aliases FAT keeps.
VFAT_OPTIONS = "codepage=437,iocharset=ascii,shortname=mixed"
#: dirsync: each directory change (create, rename, unlink) is on the disk when the call
#: returns, in the order vfat makes it: a rename writes the new name whole (clusters and
#: size) before it removes the old one, so a power cut leaves one name or two names of
#: one file, never a name whose clusters were already freed (see boot/esp_repair.py).
VFAT_FLAGS = "nosuid,nodev,noexec,noatime,dirsync"
_SLOT_ARG = "basalt.slot="


class EntryEditError(BasaltError):
    """The target's ESP holds no Basalt boot entry to add kernel arguments to."""


def with_kernel_args(text: str, args: Sequence[str]) -> str:
    """The entry ``text`` with ``args`` appended to its options, before ``basalt.slot=``;
    unchanged when its options already end with them (a repeated install)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        key, _, value = line.strip().partition(" ")
        if key != "options":
            continue
        words = value.split()
        slot = [w for w in words if w.startswith(_SLOT_ARG)]
        rest = [w for w in words if not w.startswith(_SLOT_ARG)]
        if args and rest[-len(args) :] != list(args):
            rest += args
        lines[i] = "options " + " ".join([*rest, *slot]) + "\n"
        return "".join(lines)
    raise EntryEditError(
        "the boot entry has no options line", hint="install from an unmodified Basalt image"
    )


def edit_entries(esp: Path, args: Sequence[str]) -> list[str]:
    """Add ``args`` to every Basalt entry on the ESP mounted at ``esp``; their names."""
    directory = esp / ENTRIES
    try:
        names = sorted(
            n for n in os.listdir(directory) if n.startswith("basalt-") and n.endswith(".conf")
        )
    except FileNotFoundError:
        names = []
    if not names:
        raise EntryEditError(
            f"the ESP has no Basalt boot entry in /{ENTRIES}",
            hint="install from an unmodified Basalt image",
        )
    for name in names:
        path = directory / name
        text = path.read_text(encoding="ascii")
        edited = with_kernel_args(text, args)
        if edited != text:
            write_atomic(path, edited.encode("ascii"), mode=None)  # vfat: no modes
    return names


@contextlib.contextmanager
def mounted_esp(device: str, mountpoint: Path, *, offset: int = 0, size: int = 0) -> Iterator[Path]:
    """The ESP on ``device`` mounted read-write at ``mountpoint`` for a block; with
    ``size``, the ESP is the ``size`` bytes at ``offset`` of ``device`` (a loop device
    covers them). Unmounting flushes everything. Metal slots mount the ESP this way too."""
    from ..sys import loop, mount

    mountpoint.mkdir(parents=True, exist_ok=True)
    flags, _ = mount.parse_options(VFAT_FLAGS)
    attached = None
    if size:
        attached = loop.attach(Path(device), read_only=False, offset=offset, size_limit=size)
    try:
        mount.mount(
            str(attached.device) if attached else device, mountpoint, "vfat", flags, VFAT_OPTIONS
        )
    finally:
        if attached is not None:
            attached.close()  # autoclear: the device goes once it is unmounted
    try:
        yield mountpoint
    finally:
        os.sync()
        mount.umount(mountpoint)
