"""Print the wheel pins of image.lock as pip constraints (``name==version`` lines).

The venv installs with these, so the Basalt that tests run and the Basalt the image
carries use the same wheels, and ``make image`` on a fresh machine finds its lock current.
Runs before the venv exists: the standard library only, reading the lock's fixed layout
(``wheels:``, then two-space names with a four-space ``version:``).
"""

from __future__ import annotations

import sys
from pathlib import Path


def pins(text: str) -> list[str]:
    out: list[str] = []
    section = name = ""
    for line in text.splitlines():
        if line and not line.startswith(" "):
            section = line.rstrip(":")
        elif section == "wheels" and line.startswith("  ") and not line.startswith("   "):
            name = line.strip().rstrip(":")
        elif section == "wheels" and line.strip().startswith("version:"):
            version = line.split(":", 1)[1].strip().strip("'\"")
            out.append(f"{name}=={version}")
    return out


if __name__ == "__main__":
    lock = Path(sys.argv[1] if len(sys.argv) > 1 else "image.lock")
    found = pins(lock.read_text())
    if not found:
        sys.exit(f"{lock}: no wheel pins found under 'wheels:'")
    print("\n".join(found))
