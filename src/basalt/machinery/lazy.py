"""Package exports imported on first use (a module ``__getattr__``, PEP 562).

A package whose ``__init__`` imported every submodule made each light import of one of
them (``from pkg.paths import X``) pay for all the others; on a metal node's first boot
under TCG that cost seconds before its maintenance API could open. Such a package lists
its exports per submodule and imports them for type checkers only::

    if TYPE_CHECKING:
        from .render import render_assets
    __getattr__ = lazy.exports(__name__, {"render": ("render_assets",)})

An exported name must not be a submodule's name too: importing ``pkg.render`` binds the
module to ``pkg.render`` and the export could never be looked up (tests/unit/test_lazy.py).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, submodules: Mapping[str, tuple[str, ...]]) -> Callable[[str], Any]:
    """``package``'s module ``__getattr__``: each name of ``submodules[sub]`` comes from
    ``package.sub``, imported when the name is first looked up, then kept on the package."""
    where = {name: sub for sub, names in submodules.items() for name in names}

    def __getattr__(name: str) -> Any:
        submodule = where.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
