"""Just enough ELF for Basalt: sections, the dynamic table, and kernel module metadata.

The imager resolves shared libraries from the ``DT_NEEDED`` entries of the files it
ships (never from a guessed list) and orders kernel modules by the ``depends=`` line of
their ``.modinfo`` section; a metal node reads the same section to load a module's
dependencies first. Sections are read from 32- and 64-bit ELF of either byte order; the
dynamic table (programs and libraries) from 64-bit little-endian ELF only: images are
x86_64.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import BasaltError

__all__ = [
    "ELF_MAGIC",
    "ElfFormatError",
    "ElfInfo",
    "is_elf",
    "modinfo",
    "module_name",
    "read_elf",
    "section",
    "sections",
]

ELF_MAGIC = b"\x7fELF"
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_ET_EXEC = 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_SONAME = 0, 1, 5, 14


class ElfFormatError(BasaltError, ValueError):
    """The bytes are not the ELF file expected, or its tables point outside the file."""


@dataclass(frozen=True)
class ElfInfo:
    """What the imager needs to know about one program or library."""

    needed: tuple[str, ...]
    soname: str | None
    interpreter: str | None
    static_executable: bool = False

    @property
    def is_program(self) -> bool:
        """A program (not a library): it names a dynamic loader and has no soname
        (``libc.so.6`` and the loader itself have both), or it is a static executable."""
        return self.static_executable or (self.interpreter is not None and self.soname is None)


def is_elf(path: Path) -> bool:
    """Whether ``path`` is a regular file that starts with the ELF magic."""
    try:
        with path.open("rb") as stream:
            return stream.read(4) == ELF_MAGIC
    except (IsADirectoryError, PermissionError):
        return False


def module_name(filename: str) -> str:
    """``"kernel/drivers/virtio-rng.ko"`` -> ``"virtio_rng"``: the kernel treats - and _
    alike."""
    return filename.rsplit("/", 1)[-1].removesuffix(".ko").replace("-", "_")


def _cstring(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    return data[offset : end if end >= 0 else len(data)].decode(errors="replace")


def sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents; raises :class:`ElfFormatError` for anything else."""
    try:
        return _sections(data)
    except (struct.error, IndexError) as exc:
        raise ElfFormatError(f"ELF section table is cut short: {exc}") from None


def _sections(data: bytes) -> dict[str, bytes]:
    if data[:4] != ELF_MAGIC or len(data) < 52 or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise ElfFormatError("not an ELF file")
    order = "<" if data[5] == 1 else ">"
    if data[4] == 2:
        (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x3A)
        layout = order + "IIQQQQIIQQ"
    else:
        (shoff,) = struct.unpack_from(order + "I", data, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x2E)
        layout = order + "IIIIIIIIII"
    if shoff == 0 or shnum == 0 or shoff + shnum * shentsize > len(data):
        raise ElfFormatError("ELF section table is missing or truncated")
    if shstrndx >= shnum:
        raise ElfFormatError("ELF section name table is missing")
    headers = [struct.unpack_from(layout, data, shoff + i * shentsize) for i in range(shnum)]
    names_at, names_size = headers[shstrndx][4], headers[shstrndx][5]
    names = data[names_at : names_at + names_size]
    found: dict[str, bytes] = {}
    for header in headers:
        name_offset, offset, size = header[0], header[4], header[5]
        found.setdefault(_cstring(names, name_offset), data[offset : offset + size])
    return found


def section(data: bytes, name: str) -> bytes | None:
    """The bytes of the section called ``name``, or None when there is none."""
    return sections(data).get(name)


def modinfo(data: bytes) -> dict[str, list[str]]:
    """A kernel module's ``.modinfo``: ``{"depends": ["a,b"], "parm": [...], ...}`` (every
    value of a repeated key, in order)."""
    info: dict[str, list[str]] = {}
    for entry in (section(data, ".modinfo") or b"").split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def read_elf(path: Path) -> ElfInfo:
    """The needed libraries, soname and interpreter of a program or library."""
    try:
        return _dynamic(path.read_bytes())
    except (struct.error, IndexError, ValueError) as exc:
        raise ElfFormatError(f"{path}: {exc}") from None


def _dynamic(data: bytes) -> ElfInfo:
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ElfFormatError("not a 64-bit little-endian ELF file")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    static = struct.unpack_from("<H", data, 0x10)[0] == _ET_EXEC
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    interpreter = None
    for index in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + index * phentsize
        )
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == _PT_INTERP:
            interpreter = _cstring(data, p_offset)
    if dynamic is None:
        return ElfInfo((), None, interpreter, static and interpreter is None)
    entries: list[tuple[int, int]] = []
    offset, size = dynamic
    for at in range(offset, offset + size, 16):
        tag, value = struct.unpack_from("<qQ", data, at)
        if tag == _DT_NULL:
            break
        entries.append((tag, value))
    strtab = next((value for tag, value in entries if tag == _DT_STRTAB), None)
    if strtab is None:
        raise ElfFormatError("dynamic section without a string table")
    base = _file_offset(loads, strtab)
    needed = tuple(_cstring(data, base + value) for tag, value in entries if tag == _DT_NEEDED)
    soname = next(
        (_cstring(data, base + value) for tag, value in entries if tag == _DT_SONAME), None
    )
    return ElfInfo(needed, soname, interpreter, static and interpreter is None)


def _file_offset(loads: list[tuple[int, int, int]], vaddr: int) -> int:
    for start, offset, size in loads:
        if start <= vaddr < start + size:
            return offset + (vaddr - start)
    raise ElfFormatError(f"address {vaddr:#x} is in no loaded segment")
