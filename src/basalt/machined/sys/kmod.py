"""Kernel modules: find a module under /lib/modules/RELEASE and load it with finit_module(2).

Dependencies come from the module itself (the ``depends=`` entry of its ``.modinfo``
ELF section), so no modules.dep is needed; when one exists it only speeds up finding
files. A module that is already loaded (or built into the kernel) counts as loaded.
Modules must be uncompressed ``.ko`` files (the image ships them so).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from basalt.machinery.elf import ElfFormatError, modinfo, module_name
from basalt.machinery.errors import BasaltError

from ._libc import check, libc

__all__ = [
    "KernelModuleError",
    "ModuleIndex",
    "load_module",
    "module_name",
    "parse_modinfo",
]

#: finit_module(2) by architecture (x86_64 has its own table; arm64 and riscv use the
#: generic one).
_SYS_FINIT_MODULE = {"x86_64": 313, "aarch64": 273, "riscv64": 273, "i686": 350, "armv7l": 379}

#: Loads one module file with its parameters; returns False when it was already loaded.
Loader = Callable[[Path, str], bool]


class KernelModuleError(BasaltError):
    """A kernel module could not be found, read or loaded; the message names it."""


def parse_modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a module: ``{"depends": ["a,b"], "parm": [...], ...}``."""
    try:
        return modinfo(elf)
    except ElfFormatError as exc:
        raise KernelModuleError(f"not a kernel module: {exc}") from None


def dependencies(info: dict[str, list[str]]) -> list[str]:
    return [module_name(d) for v in info.get("depends", []) for d in v.split(",") if d]


class ModuleIndex:
    """The modules of one kernel release below ``root`` (``/lib/modules/RELEASE``)."""

    def __init__(self, root: Path | None = None, sysfs: Path = Path("/sys/module")) -> None:
        self.root = root or Path("/lib/modules") / os.uname().release
        self.sysfs = sysfs
        self._files: dict[str, Path] | None = None

    def _index(self) -> dict[str, Path]:
        if self._files is None:
            files: dict[str, Path] = {}
            dep = self.root / "modules.dep"
            if dep.is_file():
                for line in dep.read_text().splitlines():
                    relative = line.partition(":")[0].strip()
                    if relative.endswith(".ko"):
                        files.setdefault(module_name(relative), self.root / relative)
            elif self.root.is_dir():
                for path in sorted(self.root.rglob("*.ko")):
                    files.setdefault(module_name(path.name), path)
            self._files = files
        return self._files

    def find(self, name: str) -> Path | None:
        return self._index().get(module_name(name))

    def builtin(self, name: str) -> bool:
        listed = self.root / "modules.builtin"
        if listed.is_file():
            names = {module_name(line.strip()) for line in listed.read_text().splitlines()}
            if module_name(name) in names:
                return True
        # A built-in module with parameters has a /sys/module entry without initstate.
        entry = self.sysfs / module_name(name)
        return entry.is_dir() and not (entry / "initstate").exists()

    def loaded(self, name: str) -> bool:
        try:
            state = (self.sysfs / module_name(name) / "initstate").read_text().strip()
        except OSError:
            return False
        return state in ("live", "coming")


def finit_module(path: Path, parameters: str) -> bool:
    """Load one module file; False when the kernel says it is already loaded."""
    number = _SYS_FINIT_MODULE.get(os.uname().machine)
    if number is None:
        raise KernelModuleError(f"loading modules is not supported on {os.uname().machine}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscall = libc().syscall
        result = syscall(ctypes.c_long(number), fd, parameters.encode(), 0)
        check(result, str(path))
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return False
        raise
    finally:
        os.close(fd)
    return True


def load_module(
    name: str,
    parameters: Sequence[str] = (),
    *,
    index: ModuleIndex | None = None,
    loader: Loader = finit_module,
) -> list[str]:
    """Load ``name`` and, first, what it depends on; returns the modules loaded now.

    ``parameters`` (``key=value``) apply to ``name`` only. Already loaded and built-in
    modules are skipped (a loaded module keeps the parameters it was loaded with).
    Raises :class:`KernelModuleError` naming the module and the reason.
    """
    index = index or ModuleIndex()
    loaded: list[str] = []
    _load(module_name(name), " ".join(parameters), index, loader, loaded, set(), [])
    return loaded


def _load(
    name: str,
    parameters: str,
    index: ModuleIndex,
    loader: Loader,
    loaded: list[str],
    seen: set[str],
    chain: list[str],
) -> None:
    if name in chain:
        cycle = " -> ".join([*chain, name])
        raise KernelModuleError(f"kernel module {name}: circular dependency {cycle}")
    if name in seen or index.loaded(name):
        return
    path = index.find(name)
    if path is None:
        if index.builtin(name):
            return
        raise KernelModuleError(
            f"kernel module {name} not found in {index.root}",
            hint="check the name (modinfo NAME on a machine with this kernel) "
            "or add the module to the image",
        )
    try:
        info = parse_modinfo(path.read_bytes())
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise KernelModuleError(f"kernel module {name}: cannot read {path}: {reason}") from exc
    for dependency in dependencies(info):
        _load(dependency, "", index, loader, loaded, seen, [*chain, name])
    try:
        if loader(path, parameters):
            loaded.append(name)
        seen.add(name)
    except OSError as exc:
        raise KernelModuleError(
            f"kernel module {name} ({path}) failed to load: {exc.strerror}"
            + (f" (parameters: {parameters})" if parameters else "")
        ) from exc
