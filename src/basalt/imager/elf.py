"""Just enough ELF to assemble a root: what a file needs, and what a kernel module needs.

The imager resolves shared libraries from the ``DT_NEEDED`` entries of the files it
ships (never from a guessed list), and orders kernel modules by the ``depends=`` line
of their ``.modinfo`` section. Only 64-bit little-endian ELF is read: the images are
x86_64.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_ET_EXEC = 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_SONAME = 0, 1, 5, 14


class ElfFormatError(ValueError):
    """The file is not a 64-bit little-endian ELF file, or its tables are cut short."""


@dataclass(frozen=True)
class ElfInfo:
    """What the imager needs to know about one ELF file."""

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


def _header(data: bytes) -> tuple[int, int, int, int, int, int]:
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ElfFormatError("not a 64-bit little-endian ELF file")
    # e_phoff, e_shoff, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    return phoff, phnum, phentsize, shoff, shnum, shentsize


def _cstring(data: bytes, offset: int) -> str:
    end = data.index(b"\0", offset)
    return data[offset:end].decode()


def read_elf(path: Path) -> ElfInfo:
    """The needed libraries, soname and interpreter of an ELF file."""
    data = path.read_bytes()
    try:
        return _read(data)
    except (struct.error, IndexError, ValueError) as exc:
        raise ElfFormatError(f"{path}: {exc}") from None


def _read(data: bytes) -> ElfInfo:
    phoff, phnum, phentsize, _, _, _ = _header(data)
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


def section(data: bytes, name: str) -> bytes | None:
    """The bytes of the section called ``name`` (relocatable objects such as ``.ko``)."""
    _, _, _, shoff, shnum, shentsize = _header(data)

    def entry(index: int) -> tuple[int, int, int]:
        sh_name, _, _, _, sh_offset, sh_size = struct.unpack_from(
            "<IIQQQQ", data, shoff + index * shentsize
        )
        return sh_name, sh_offset, sh_size

    (shstrndx,) = struct.unpack_from("<H", data, 0x3E)
    _, names_offset, _ = entry(shstrndx)
    for index in range(shnum):
        sh_name, offset, size = entry(index)
        if _cstring(data, names_offset + sh_name) == name:
            return data[offset : offset + size]
    return None


def module_info(path: Path) -> dict[str, str]:
    """A kernel module's ``.modinfo`` fields (``name``, ``depends``, ...); last one wins."""
    data = path.read_bytes()
    try:
        raw = section(data, ".modinfo")
    except (struct.error, IndexError, ValueError) as exc:
        raise ElfFormatError(f"{path}: {exc}") from None
    fields: dict[str, str] = {}
    for item in (raw or b"").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            fields[key] = value
    return fields
