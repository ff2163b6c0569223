"""Programs the tests run as real peers that are not worth installing on the host: the
Debian package is downloaded once (apt checks it against the signed archive) and
unpacked under ``_out/tools``; nothing is installed and no service is started."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "_out" / "tools"


def unpacked(package: str, program: str) -> Path:
    """``program`` (a path inside ``package``) from the unpacked Debian package."""
    tree = TOOLS / package
    path = tree / program
    if path.exists():
        return path
    TOOLS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=TOOLS) as tmp:
        subprocess.run(
            ["apt-get", "download", "-q", package], cwd=tmp, check=True, capture_output=True
        )
        (deb,) = Path(tmp).glob(f"{package}_*.deb")
        work = Path(tmp) / "tree"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work)], check=True)
        work.rename(tree)
    return path
