"""Architecture boundaries: the import contracts (.importlinter) hold, and they break on an
upward import or a cycle; the CLI starts light."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "basalt"


ROOT = SRC.parents[1]
CONTRACTS = ROOT / ".importlinter"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the tree under ``root`` (its src/ first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(CONTRACTS), "--no-cache"],
        check=False,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_contracts_hold() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _copy_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the source tree whose ``module`` also imports ``line``, inside a function
    (an import there counts like any other)."""
    shutil.copytree(SRC, tmp_path / "src" / "basalt", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "src" / Path(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + f"\n\ndef _probe() -> None:\n    {line}  # noqa\n")
    return tmp_path


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # The kernel interfaces reaching up into the API.
        ("basalt.machined.sys.mount", "from basalt.machined.api import server", "machined:"),
        # The shared library importing the node agent.
        ("basalt.machinery.pki", "import basalt.machined.node", "Packages:"),
        # Two siblings of one layer (apply imports install) importing each other.
        ("basalt.machined.install", "from basalt.machined import apply", "No import cycles"),
    ],
    ids=["upward in machined", "upward between packages", "cycle between siblings"],
)
def test_an_upward_import_or_a_cycle_breaks_a_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    result = _lint_imports(_copy_with(tmp_path, module, line))
    assert result.returncode != 0, result.stdout
    report = result.stdout.split("Broken contracts")[-1]
    assert broken in report, result.stdout


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
