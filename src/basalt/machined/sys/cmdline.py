"""The kernel command line: what the boot entry (or a kexec) told this boot."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CMDLINE", "kernel_arg"]

CMDLINE = Path("/proc/cmdline")


def kernel_arg(name: str, cmdline: Path = CMDLINE) -> str:
    """The value of the last ``name=`` on the command line; '' when absent or unreadable."""
    try:
        words = cmdline.read_text().split()
    except OSError:
        return ""
    values = [w.partition("=")[2] for w in words if w.startswith(name + "=")]
    return values[-1] if values else ""
