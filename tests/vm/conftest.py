"""Shared fixtures of the VM tests: the image is built once per session (stages cached)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TOOLS = ("qemu-system-x86_64", "mksquashfs", "unsquashfs", "apt-get", "dpkg-deb")


@pytest.fixture(scope="session")
def image_dir() -> Path:
    """Build (or reuse from ``_out/cache``) the image from image.lock into ``_out/image``."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run 'make image-deps' as root")
    from basalt.imager import pipeline

    pipeline.build()
    return pipeline.DEFAULT_OUT
