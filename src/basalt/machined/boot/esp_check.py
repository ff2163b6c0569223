"""The I/O around :mod:`.esp_repair`: list the ESP, carry out the plan.

On a node the ESP is read from its device while it is not mounted (:mod:`.fat`): every
file with its cluster chain, so that two names sharing clusters and names whose clusters
the FAT counts as free are seen. The plan's erasures are written on the device (still
unmounted), then the ESP is mounted for its unlinks. Each step is durable before the
next one starts, and a cut between them leaves a state the next boot's plan finishes.

In tests (and for an ESP that is a plain directory) there are no clusters to share:
files are listed with ``os`` and every removal is an unlink.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from basalt.machinery.boot.assessment import SlotName
from basalt.machinery.boot.esp import Esp, EspError

from ..sys import mount
from .esp_repair import ENTRIES_DIR, EspFile, EspPlan, managed, plan
from .fat import Chain, FatFile, FatVolume

log = logging.getLogger(__name__)

#: Entries larger than this are not read (Basalt's are about 200 bytes).
_ENTRY_LIMIT = 64 * 1024


def _is_entry(path: str) -> bool:
    directory, _, name = path.rpartition("/")
    return directory.lower() == ENTRIES_DIR and name.lower().endswith(".conf")


def files_on_volume(volume: FatVolume, thorough: bool = True) -> dict[str, tuple[EspFile, FatFile]]:
    """Every file on the volume as the repair sees it, by path. Not ``thorough``: the
    chains of large files (kernels, initrds) are followed only in a directory that holds
    a leftover temporary file; a boot needs no more, and an install checks them all."""
    walked = volume.walk()
    leftovers = {f.path.rpartition("/")[0] for f in walked if f.name.startswith(".")}

    def follow(item: FatFile) -> bool:
        small = item.is_dir or _is_entry(item.path) or item.name.startswith(".")
        return thorough or small or item.path.rpartition("/")[0] in leftovers

    chains = {item.path: volume.chain(item) for item in walked if follow(item)}
    by_end: dict[int, list[str]] = {}  # chains that share a cluster end at the same one
    for path, chain in chains.items():
        if chain.end:
            by_end.setdefault(chain.end, []).append(path)
    found = {}
    for item in walked:
        if item.is_dir:
            continue
        chain = chains.get(item.path, Chain(0, 0))
        shared = set(by_end.get(chain.end, ())) if managed(item.path) and chain.end else set()
        shared.discard(item.path)
        text = None
        if _is_entry(item.path) and item.size <= _ENTRY_LIMIT:
            text = volume.read(item).decode("ascii", errors="replace")
        seen = EspFile(item.path, item.size, tuple(sorted(shared)), chain.problem, text)
        found[item.path] = (seen, item)
    return found


def files_in_directory(root: Path) -> list[EspFile]:
    """The files below ``root`` (an ESP mounted, or a plain directory in tests)."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            size = path.stat().st_size
            text = None
            if _is_entry(relative) and size <= _ENTRY_LIMIT:
                text = path.read_text(encoding="ascii", errors="replace")
            found.append(EspFile(relative, size, text=text))
    return found


def _report(done: EspPlan) -> EspPlan:
    for removal in done.removals:
        log.warning("ESP repair: %s", removal.message())
    for problem in done.left:
        log.error("ESP check: %s", problem)
    return done


def repair_directory(root: Path, booted: SlotName | None) -> EspPlan:
    """Plan and carry out the repair of an ESP that is a plain directory."""
    done = plan(files_in_directory(root), booted)
    esp = Esp(root)
    for removal in done.removals:
        esp.remove(removal.path)
    return _report(done)


def repair_device(
    device: str,
    booted: SlotName | None,
    mounted: Callable[[], contextlib.AbstractContextManager[object]],
    mountpoint: Path,
    thorough: bool = True,
) -> EspPlan:
    """Plan and carry out the repair of the (unmounted) ESP on ``device``: erasures on the
    device, then unlinks with the ESP mounted by ``mounted()`` at ``mountpoint``. Not
    ``thorough``: see :func:`files_on_volume`."""
    where = mount.mounted_from(device)
    if where:
        raise EspError(
            f"the ESP {device} is mounted at {', '.join(where)}: it is checked only unmounted",
        )
    started = time.monotonic()
    with FatVolume.open(device, writable=True) as volume:
        files = files_on_volume(volume, thorough)
        done = plan((seen for seen, _ in files.values()), booted)
        for removal in done.erasures:
            volume.erase(files[removal.path][1])
    if done.unlinks:
        with mounted():
            esp = Esp(mountpoint)
            for removal in done.unlinks:
                esp.remove(removal.path)
    if not done.removals and not done.left:
        log.info(
            "ESP %s checked%s: %d files, nothing to repair (%.2f s)",
            device,
            " (every chain)" if thorough else "",
            len(files),
            time.monotonic() - started,
        )
    return _report(done)
