"""Every library module imports on its own, first, in a fresh interpreter.

A circular import only shows when a module is the first one imported; inside one
pytest process everything is already imported, so this runs a child interpreter.
"""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "basalt.machinery.config.secrets",
    "basalt.machinery.config",
    "basalt.machinery.config.generate",
    "basalt.machinery.config.patch",
    "basalt.machinery.config.validate",
    "basalt.machinery.config.bundle",
    "basalt.machinery.config.machine",
    "basalt.machinery.client",
    "basalt.machinery.client.config",
    "basalt.machinery.pki",
    "basalt.machinery.images",
    "basalt.machinery.images.keys",
    "basalt.machinery.images.verify",
    "basalt.machined.boot",
    "basalt.machined.kubernetes.cordon",
    "basalt.machined.kubernetes.intent",
]


def test_each_module_imports_first() -> None:
    script = "\n".join(
        [
            "import importlib, sys",
            "failed = []",
            f"for name in {MODULES!r}:",
            "    for loaded in [m for m in sys.modules if m.startswith('basalt')]:",
            "        del sys.modules[loaded]",
            "    try:",
            "        importlib.import_module(name)",
            "    except Exception as exc:",
            "        failed.append(f'{name}: {exc!r}')",
            "print('\\n'.join(failed))",
            "sys.exit(1 if failed else 0)",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_machinery_imports_nothing_else_from_basalt() -> None:
    script = (
        "import sys\n"
        "import basalt.machinery.config, basalt.machinery.client, basalt.machinery.config.secrets\n"
        "others = sorted(m for m in sys.modules if m.startswith('basalt.')\n"
        "                and not m.startswith('basalt.machinery'))\n"
        "print(others)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
