"""Local clusters. Two provisioners, both rootless:

``process``
    every node a machined process on its own loopback address (the default);
``qemu``
    every node a QEMU VM booting the system image, reached through loopback forwards.

A cluster's ``cluster.json`` names its provisioner; :func:`backend` finds the module
that knows how to tell whether its machines run and how to stop them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

PROVISIONERS = ("process", "qemu")


def backend(provisioner: str) -> ModuleType:
    """The module of a provisioner: ``create``, ``destroy``, ``machine_running``, ..."""
    if provisioner not in PROVISIONERS:
        from basalt.machinery.errors import BasaltError

        raise BasaltError(
            f"unknown provisioner {provisioner!r}", hint=f"one of: {', '.join(PROVISIONERS)}"
        )
    return importlib.import_module(f"{__name__}.{provisioner}")
