"""Packages whose exports are imported on first use (basalt.machinery.lazy)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

LAZY_PACKAGES = [
    "basalt.machinery.images",
    "basalt.machinery.kubernetes",
    "basalt.machinery.client",
]


@pytest.mark.parametrize("name", LAZY_PACKAGES)
def test_every_export_resolves_and_none_is_a_submodule_name(name: str) -> None:
    package = importlib.import_module(name)
    submodules = {info.name for info in pkgutil.iter_modules(package.__path__)}
    for export in package.__all__:
        value = getattr(package, export)
        if export in submodules:  # only the submodule itself may go by its name
            assert value is importlib.import_module(f"{name}.{export}"), f"{name}.{export}"


def test_an_unknown_name_is_an_attribute_error() -> None:
    package = importlib.import_module("basalt.machinery.images")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        package.nope  # noqa: B018
    with pytest.raises(ImportError):
        exec("from basalt.machinery.images import nope", {})


def test_a_light_submodule_does_not_import_its_siblings() -> None:
    """The reason for all this: reading a bundle's version or a Kubernetes path on a
    node's first boot must not import cryptography's signatures or the config models."""
    script = (
        "import sys\n"
        "import basalt.machinery.images.manifest, basalt.machinery.kubernetes.paths\n"
        "import basalt.machinery.client.client\n"
        "heavy = ['basalt.machinery.images.keys', 'basalt.machinery.images.verify',\n"
        "         'basalt.machinery.config', 'basalt.machinery.client.config', 'yaml']\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
