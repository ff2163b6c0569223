"""What to repair on the ESP after a power cut, decided from a listing (pure).

FAT has no atomic rename. Every rename (systemd-boot counting a try, machined marking
an entry good or rolling back, a temporary file renamed into place) creates the new
name and removes the old one as two directory writes, and a power cut between them
leaves states a journaled filesystem never shows. These are the ones that reach the
directories Basalt manages (``loader/entries``, ``EFI/basalt/A``, ``EFI/basalt/B``):

- **two names for one entry**: the old and the new name point at the same clusters
  (the firmware's rename; Linux's once it wrote the new entry in full), or the new
  name is still empty (Linux writes it first, then its clusters and size);
- **a temporary file** (``.NAME.XXXX``, which systemd-boot ignores) from a write that
  was cut short, possibly sharing its clusters with the name it was renamed to;
- **a name whose clusters the FAT counts as free**: a removal whose FAT update reached
  the disk before its directory update (a torn ``unlink`` or replace).

The rule that decides which name of a slot's entry stays is systemd-boot's own: it
skips entries without a ``linux``/``efi`` line or whose kernel file does not exist, and
boots the first of the rest in :func:`.entries.loader_order`. Keeping exactly that
name means the repair changes nothing about what boots, at any point of it. (META
cannot help here: it records reasons and the pending upgrade, which every name of one
entry shares; names differ only in their counters, and systemd-boot's order already
says which one it boots.)

A name is removed in one of two ways (:class:`How`): ``UNLINK`` through the mounted
vfat when the file owns its clusters alone, which frees them; ``ERASE`` on the device
(:meth:`.fat.FatVolume.erase`) when its clusters are shared or not a valid chain, which
removes the name and frees nothing: unlinking it would free clusters the other name
still uses, and freeing an already free chain makes the kernel remount the ESP
read-only. Each removal is one atomic step, and :func:`plan` of any state the steps
leave behind continues with the rest: the repair is idempotent and may be cut anywhere.

What is not safe to change is left alone and reported (``EspPlan.left``): a problem
with the files of the slot that booted, or of a slot that still has a boot entry.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from basalt.machinery.boot.assessment import SlotName
from basalt.machinery.boot.entries import BasaltEntry, BootEntryError, loader_order

ENTRIES_DIR = "loader/entries"
SLOT_DIRS = {f"efi/basalt/{slot.value}": slot for slot in SlotName}
MANAGED_DIRS = (ENTRIES_DIR, *(f"EFI/basalt/{slot.value.upper()}" for slot in SlotName))


class How(enum.Enum):
    """How a name is removed."""

    UNLINK = "unlink"  #: through the mounted vfat: the file's clusters are freed
    ERASE = "erase"  #: its directory entry marked deleted on the device; nothing freed


@dataclass(frozen=True)
class EspFile:
    """A file on the ESP as the repair sees it. ``shared_with``: the other paths whose
    cluster chains overlap this one's; ``problem``: why its chain is not a valid chain of
    its size; ``text``: a boot entry's content (None for other files)."""

    path: str
    size: int
    shared_with: tuple[str, ...] = ()
    problem: str | None = None
    text: str | None = None

    @property
    def directory(self) -> str:
        return self.path.rpartition("/")[0]

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


@dataclass(frozen=True)
class Removal:
    """One name to remove, how, and why (what the log line and the event say)."""

    path: str
    how: How
    reason: str

    def message(self) -> str:
        how = (
            "erased from its directory, its clusters not freed"
            if self.how is How.ERASE
            else "unlinked"
        )
        return f"removed {self.path}: {self.reason} ({how})"


@dataclass(frozen=True)
class EspPlan:
    """The removals, in the order to make them, and what is wrong but left alone."""

    removals: tuple[Removal, ...] = ()
    left: tuple[str, ...] = ()

    @property
    def erasures(self) -> tuple[Removal, ...]:
        return tuple(r for r in self.removals if r.how is How.ERASE)

    @property
    def unlinks(self) -> tuple[Removal, ...]:
        return tuple(r for r in self.removals if r.how is How.UNLINK)


def managed(path: str) -> bool:
    """Whether ``path`` is in one of the directories Basalt writes (FAT is case-blind)."""
    directory = path.rpartition("/")[0].lower()
    return directory == ENTRIES_DIR or directory in SLOT_DIRS


def loader_path(text: str) -> str | None:
    """The ``linux`` (or ``efi``) file an entry names, as a lowercase ESP path."""
    found = None
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key in ("linux", "efi") and value.strip():
            found = value.strip().replace("\\", "/").strip("/").lower()
    return found


def unbootable(entry: EspFile, paths: set[str]) -> str | None:
    """Why systemd-boot would skip ``entry`` (no loader line, or its file missing)."""
    if not entry.text or not entry.text.strip():
        return "empty"
    loader = loader_path(entry.text)
    if loader is None:
        return "no linux line"
    if loader not in paths:
        return f"its kernel /{loader} is missing"
    return None


def _slot_of_entry(name: str) -> SlotName | None:
    if name.startswith("."):
        return None
    try:
        return SlotName(BasaltEntry.parse(name).slot)
    except BootEntryError:
        return None


@dataclass
class _Planner:
    files: list[EspFile]
    booted: SlotName | None
    removals: list[Removal] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    def remove(self, file: EspFile, reason: str) -> None:
        how = How.ERASE if file.shared_with or file.problem else How.UNLINK
        if how is How.ERASE and file.shared_with:
            reason += f"; it shares clusters with {', '.join(file.shared_with)}"
        elif how is How.ERASE:
            reason += f"; {file.problem}"
        self.removals.append(Removal(file.path, how, reason))

    def erased(self) -> set[str]:
        return {r.path for r in self.removals if r.how is How.ERASE}

    def temporaries(self) -> None:
        for file in self.files:
            if managed(file.path) and file.name.startswith("."):
                self.remove(file, "a temporary file left by an interrupted write")

    def entries(self) -> set[SlotName]:
        """One name per slot; returns the slots that keep a boot entry."""
        paths = {f.path.lower() for f in self.files}
        groups: dict[SlotName, dict[str, EspFile]] = {}
        for file in self.files:
            slot = _slot_of_entry(file.name)
            if file.directory.lower() == ENTRIES_DIR and slot is not None:
                groups.setdefault(slot, {})[file.name] = file
        kept: set[SlotName] = set()
        for slot, group in sorted(groups.items()):
            order = loader_order(group)
            bootable = [n for n in order if unbootable(group[n], paths) is None]
            keep = group[(bootable or order)[0]]
            for name in order:
                if name == keep.name:
                    continue
                why = unbootable(group[name], paths)
                self.remove(
                    group[name],
                    f"a second name for slot {slot}'s boot entry, left by an interrupted "
                    f"rename{f' ({why})' if why else ''}; {keep.name} stays"
                    + (", the one systemd-boot boots" if bootable else ""),
                )
            if self._keeps(slot, keep, unbootable(keep, paths)):
                kept.add(slot)
        return kept

    def _keeps(self, slot: SlotName, entry: EspFile, why: str | None) -> bool:
        """Whether the one remaining name of ``slot`` stays (else it is removed)."""
        if entry.problem is None and entry.size > 0:
            if why is not None:
                self.left.append(f"{entry.path}: systemd-boot skips it: {why}; left alone")
            return True
        if slot is self.booted:
            what = entry.problem or "it is empty"
            self.left.append(f"{entry.path}: {what}; left alone: slot {slot} booted from it")
            return True
        if entry.problem is not None:
            reason = (
                f"slot {slot}'s boot entry, whose clusters cannot be trusted: a removal cut "
                f"short; slot {slot} has no boot entry now"
            )
        else:
            reason = f"slot {slot}'s boot entry is empty (a write or rename cut short)"
        self.remove(entry, reason)
        return False

    def slot_files(self, with_entry: set[SlotName]) -> None:
        erased = self.erased()
        for file in self.files:
            slot = SLOT_DIRS.get(file.directory.lower())
            if slot is None or file.name.startswith("."):
                continue
            shared = [p for p in file.shared_with if p not in erased]
            if file.problem is None and not shared:
                continue
            what = file.problem or f"it shares clusters with {', '.join(shared)}"
            if slot in with_entry:
                self.left.append(f"{file.path}: {what}; left alone: slot {slot} has a boot entry")
                continue
            self.remove(
                file,
                f"slot {slot} has no boot entry and this file cannot be trusted (a write cut "
                "short); the next install writes it again",
            )

    def survivors(self) -> None:
        gone = {r.path for r in self.removals}
        erased = self.erased()
        for file in self.files:
            if file.path in gone or not managed(file.path) or SLOT_DIRS.get(file.directory.lower()):
                continue
            shared = [p for p in file.shared_with if p not in erased]
            if shared:
                self.left.append(
                    f"{file.path}: it shares clusters with {', '.join(shared)}; left alone"
                )


def plan(files: Iterable[EspFile], booted: SlotName | None) -> EspPlan:
    """The removals that leave one bootable name per slot and no leftovers, without
    changing which entry systemd-boot boots; ``booted`` is the slot running now."""
    planner = _Planner(sorted(files, key=lambda f: f.path), booted)
    planner.temporaries()
    with_entry = planner.entries()
    planner.slot_files(with_entry)
    planner.survivors()
    return EspPlan(tuple(planner.removals), tuple(planner.left))
