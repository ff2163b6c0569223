"""Releases for update tests: a deliberately broken build of this source tree, a fleet
cluster template that follows a channel, a timestamp signed to be expired already."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from basalt.machinery.releases.repository import Repository

if TYPE_CHECKING:
    from tests.fakes.fleet import FleetProcess

#: Appended to machined/health.py: one health check always fails, so a slot on trial
#: never passes its gates and the node falls back.
BROKEN_HEALTH = '''

_working_checks = run_checks


async def run_checks(node: Node, **options: bool) -> list[Check]:  # type: ignore[no-redef]
    """A deliberately broken build: one health check always fails."""
    broken = Check("broken", False, "deliberately broken build")
    return [*(await _working_checks(node, **options)), broken]
'''


def broken_tree(source: Path, work: Path) -> Path:
    """A copy of the ``basalt`` package at ``source`` whose health gates always fail."""
    tree = work / "broken" / "basalt"
    shutil.copytree(source, tree, ignore=shutil.ignore_patterns("__pycache__"))
    with (tree / "machined" / "health.py").open("a") as handle:
        handle.write(BROKEN_HEALTH)
    return tree


def channel_template(name: str, trust: str, channel: str = "stable") -> str:
    """A fleet cluster of 3 control planes and a worker that trusts ``trust`` (an
    ImageVerificationConfig document) and follows ``channel``."""
    return yaml.safe_dump(
        {
            "apiVersion": "fleet.basalt.dev/v1alpha1",
            "kind": "Cluster",
            "name": name,
            "controlPlane": {"count": 3},
            "workers": [{"name": "default", "count": 1}],
            "updates": {"channel": channel},
            "patches": [trust],
        },
        sort_keys=False,
    )


def apply_channel_cluster(fleet: FleetProcess, root: Path, name: str, trust: str) -> Path:
    """:func:`channel_template` applied with ``basaltctl fleet apply`` and exported; the
    export's directory (secrets.yaml, basaltconfig, ...)."""
    path = root / f"{name}.yaml"
    path.write_text(channel_template(name, trust))
    fleet.ctl("fleet", "apply", "-f", str(path), "--timeout", "300")
    fleet.ctl("fleet", "export", name, "-o", str(root / f"export-{name}"))
    return root / f"export-{name}"


def expire_timestamp(repo: Repository) -> None:
    """A newer timestamp that expired an hour ago, signed with the repository's key."""
    from tuf.api.metadata import Metadata

    expired = Metadata.from_file(str(repo.metadata / "timestamp.json"))
    expired.signed.version += 1
    expired.signed.expires = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    expired.signatures.clear()
    expired.sign(repo._signer("timestamp"))
    repo._save("timestamp", expired)
