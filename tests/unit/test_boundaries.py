"""Architecture boundaries: machinery imports nothing else from basalt; the CLI starts light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "basalt"


def _imports(path: Path, root: Path = SRC.parent) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def test_machinery_imports_nothing_else_from_basalt() -> None:
    offenders = []
    for path in sorted((SRC / "machinery").rglob("*.py")):
        for line, module in _imports(path):
            if module.startswith("basalt") and not module.startswith("basalt.machinery"):
                offenders.append(f"{path.relative_to(SRC.parent)}:{line} imports {module}")
    assert not offenders, "basalt.machinery must stay self-contained:\n" + "\n".join(offenders)


def test_boundary_check_sees_relative_imports(tmp_path: Path) -> None:
    # The checker itself must resolve `from ...cli import x` inside machinery to basalt.cli
    # (probed in a copy of the package's shape: the source tree may be read-only).
    probe = tmp_path / "basalt" / "machinery" / "config" / "_probe_boundary.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ...cli import main\n")
    assert (1, "basalt.cli") in _imports(probe, tmp_path)


def test_cli_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\n"
        "from basalt.cli.main import main\n"
        "main(['--help'])\n"
        "names = ('pydantic', 'cryptography', 'yaml', 'jsonpatch')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    out = (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    assert out == "HEAVY:", f"basaltctl --help imported {out}; keep those imports inside commands"
