"""``basalt.config=URL``: a metal node in maintenance mode fetches its config at boot.

Kept apart from :mod:`.apply` so that a first boot without the argument never imports
what applying a config needs (the config models) before its maintenance API is open.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)


def kernel_config_url(cmdline: Path) -> str:
    """``basalt.config=URL`` of the kernel command line ('' when absent)."""
    try:
        words = cmdline.read_text().split()
    except OSError:
        return ""
    urls = [w.partition("=")[2] for w in words if w.startswith("basalt.config=")]
    return urls[-1] if urls else ""


def start_config_fetch(node: Node) -> asyncio.Task[None] | None:
    """In maintenance mode on metal: fetch ``basalt.config=URL`` in the background."""
    if not node.platform.mode.requires_install:
        return None
    url = kernel_config_url(node.platform.system_root / "proc" / "cmdline")
    if not url:
        return None
    from .apply import apply_from_url

    log.info("fetching the config from basalt.config=%s", url)
    return asyncio.create_task(apply_from_url(node, url), name="config-url")
