"""The record that an upgrade cordoned this node: ``uncordon.json`` on STATE.

Written atomically *before* the cordon and removed (durably) once the node is
uncordoned, so a crash at any point leaves either no cordon or a record of it; it
survives the reboot into the new slot and a fallback to the old one. Kept apart from
the API client so that a boot without a record imports nothing more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from basalt.machinery.fileio import write_atomic

log = logging.getLogger(__name__)

#: On STATE: the Node this upgrade cordoned, to uncordon once the node is back.
INTENT_FILE = "uncordon.json"


@dataclass(frozen=True)
class UncordonIntent:
    """An upgrade cordoned ``node`` (a Kubernetes Node name) and must uncordon it."""

    node: str

    def to_json(self) -> str:
        return json.dumps({"node": self.node}) + "\n"


def read_intent(state_dir: Path) -> UncordonIntent | None:
    try:
        data = json.loads((state_dir / INTENT_FILE).read_text())
        return UncordonIntent(str(data["node"])) if data.get("node") else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring an unreadable %s: %s", state_dir / INTENT_FILE, exc)
        return None


def write_intent(state_dir: Path, intent: UncordonIntent) -> None:
    write_atomic(state_dir / INTENT_FILE, intent.to_json(), mode=0o600)


def clear_intent(state_dir: Path) -> None:
    """Remove the record durably: after a crash that follows, nothing uncordons twice."""
    with contextlib.suppress(FileNotFoundError):
        (state_dir / INTENT_FILE).unlink()
        fd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
