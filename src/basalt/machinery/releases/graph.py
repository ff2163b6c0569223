"""The upgrade graph: which release a node takes next from its channel.

A release may say ``via: W``: a node below version W reaches it only through W (the
release W of the same channel), as upgrade guides ask for "the latest patch of each
minor first". The next hop from ``current`` is the newest release of the channel that
is newer than ``current``, not yanked and not refused by this node (a release that fell
back here is never taken again), then walked back through its ``via`` releases while the
node is below them. A node steps the whole path one hop per upgrade. Pure.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from ..errors import BasaltError, ErrorKind
from ..images.versions import version_key
from .repository import Release


class UpgradePathError(BasaltError):
    kind = ErrorKind.FAILED_PRECONDITION


def next_hop(
    current: str,
    releases: Iterable[Release],
    *,
    arch: str = "x86_64",
    refused: Collection[str] = (),
) -> Release | None:
    """The release to upgrade to now (None: the node is up to date)."""
    usable = {
        r.version: r
        for r in releases
        if r.arch == arch and not r.yanked and r.version not in refused
    }
    newer = [r for r in usable.values() if version_key(r.version) > version_key(current)]
    if not newer:
        return None
    target = max(newer, key=lambda r: version_key(r.version))
    seen = {target.version}
    while target.via and version_key(current) < version_key(target.via):
        hop = usable.get(target.via)
        if hop is None:
            raise UpgradePathError(
                f"{target.version} is reached from below {target.via} only through "
                f"{target.via}, which this channel does not offer (yanked, refused here, "
                "or never published)",
                hint=f"publish {target.via} to the channel, or pin a version",
            )
        if hop.version in seen:
            raise UpgradePathError(f"the upgrade path to {target.version} loops at {hop.version}")
        seen.add(hop.version)
        target = hop
    return target


def path(
    current: str,
    releases: Iterable[Release],
    *,
    arch: str = "x86_64",
    refused: Collection[str] = (),
) -> list[str]:
    """Every hop from ``current`` to the newest release, in order."""
    available = list(releases)
    hops: list[str] = []
    while (hop := next_hop(current, available, arch=arch, refused=refused)) is not None:
        hops.append(hop.version)
        current = hop.version
    return hops


def pinned_hop(
    current: str,
    releases: Iterable[Release],
    pinned: str,
    *,
    arch: str = "x86_64",
    refused: Collection[str] = (),
) -> Release | None:
    """The next hop towards the pinned version (None: there, or past it: a node never
    downgrades by itself). The pinned release must be in the channel and usable."""
    available = [r for r in releases if r.arch == arch]
    if version_key(current) >= version_key(pinned):
        return None
    if not any(r.version == pinned and not r.yanked for r in available):
        raise UpgradePathError(
            f"pinned version {pinned} is not offered by the channel (missing or yanked)",
            hint="pin a version 'basaltctl release list' shows, or follow the channel",
        )
    if pinned in refused:
        raise UpgradePathError(
            f"pinned version {pinned} fell back on this node before: it is not taken again",
            hint="pin another version",
        )
    below = [r for r in available if version_key(r.version) <= version_key(pinned)]
    return next_hop(current, below, arch=arch, refused=refused)
