"""EFI variables through efivarfs: what systemd-boot tells the booted system.

systemd-boot sets, in its vendor namespace, ``LoaderEntrySelected`` (the id of the entry
it booted) and, when that entry has a boot counter, ``LoaderBootCountPath`` (the ESP
path of the entry file *after* it counted the try, e.g.
``\\loader\\entries\\basalt-2-b-0.2.0+2-1.conf``): the file to rename to mark it good.
Each efivarfs file is 4 attribute bytes, then the value (here UTF-16LE, NUL-terminated).
"""

from __future__ import annotations

from pathlib import Path

from . import mount

EFIVARS = Path("/sys/firmware/efi/efivars")
#: systemd-boot's vendor GUID (LoaderInfo, LoaderEntrySelected, LoaderBootCountPath, ...).
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
ENTRY_SELECTED = "LoaderEntrySelected"
BOOT_COUNT_PATH = "LoaderBootCountPath"


def decode_string(raw: bytes) -> str:
    """An efivarfs file's value as text: skip the attributes, UTF-16LE up to the NUL."""
    text = raw[4:].decode("utf-16-le", errors="replace")
    return text.split("\0", 1)[0]


def read_loader_string(name: str, efivars: Path = EFIVARS) -> str | None:
    """systemd-boot's variable ``name`` as text; None when unset or unreadable."""
    try:
        return decode_string((efivars / f"{name}-{LOADER_GUID}").read_bytes())
    except OSError:
        return None


def mount_efivarfs(efivars: Path = EFIVARS) -> bool:
    """Mount efivarfs (read-only) where the kernel expects it; False on a non-UEFI boot."""
    if not efivars.parent.is_dir():  # /sys/firmware/efi: booted through UEFI
        return False
    if mount.is_mounted(efivars):
        return True
    flags, data = mount.parse_options("ro,nosuid,nodev,noexec")
    mount.mount("efivarfs", efivars, "efivarfs", flags, data)
    return True


def boot_count_entry(efivars: Path = EFIVARS) -> str | None:
    """The file name (in ``loader/entries``) of the counted entry that booted, if any."""
    path = read_loader_string(BOOT_COUNT_PATH, efivars)
    if not path:
        return None
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    if len(parts) != 3 or [p.lower() for p in parts[:2]] != ["loader", "entries"]:
        return None
    return parts[2]
