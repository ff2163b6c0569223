"""Kernel modules: find them in a modules tree and order them by their ``depends=``.

The Debian cloud kernel ships uncompressed ``.ko`` files and no ``modules.dep`` in its
package (depmod runs at install time), so the imager reads each module's ``.modinfo``
and writes a plain load list; the guest loads the list in order with ``finit_module``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from basalt.machinery.elf import modinfo, module_name

from .errors import ImageBuildError

__all__ = ["index", "load_order", "module_name", "resolve"]


def index(modules_dir: Path) -> dict[str, Path]:
    """Module name -> path (relative to ``modules_dir``) for every ``.ko`` below it."""
    return {
        module_name(path.name): path.relative_to(modules_dir)
        for path in sorted(modules_dir.rglob("*.ko"))
    }


def load_order(
    wanted: Iterable[str], depends: Callable[[str], list[str]], known: set[str]
) -> list[str]:
    """``wanted`` and everything they depend on, each after its dependencies."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name not in known:
            via = " <- ".join(reversed(chain)) or "the image's module list"
            raise ImageBuildError(f"kernel module {name} (wanted by {via}) is not in the kernel")
        if name in visiting:
            raise ImageBuildError(f"kernel modules depend on each other in a cycle: {chain}")
        visiting.add(name)
        for dep in depends(name):
            visit(dep, (*chain, name))
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(module_name(name), ())
    return order


def resolve(modules_dir: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """(name, relative path) of ``wanted`` and their dependencies, in load order."""
    found = index(modules_dir)

    def depends(name: str) -> list[str]:
        values = modinfo((modules_dir / found[name]).read_bytes()).get("depends", [])
        return [module_name(dep) for value in values for dep in value.split(",") if dep]

    return [(name, found[name]) for name in load_order(wanted, depends, set(found))]
