"""The two stored forms of a :class:`BootState`, both pure text in and out.

- Metal: the slots are the ``basalt-*.conf`` names in ``loader/entries`` on the ESP;
  which one booted comes from ``LoaderEntrySelected``; failure reasons live in META.
  :func:`entry_changes` says which files to create, rename or remove.
- Container: a small JSON document (``boot.json`` beside the slot directories),
  written by machined and read by the launcher before it starts a slot.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .assessment import BootState, Slot, SlotHealth, SlotName
from .entries import BasaltEntry, BootEntryError

JSON_FORMAT = 1


# -- metal: entry names ---------------------------------------------------------------------------


def slot_from_entry(entry: BasaltEntry, reason: str | None = None) -> Slot:
    return Slot(
        SlotName(entry.slot),
        entry.version,
        entry.generation,
        entry.tries_left,
        entry.tries_done if entry.tries_left is not None else 0,
        reason,
    )


def booted_slot(selected_entry: str) -> SlotName:
    """The slot of the entry systemd-boot booted (``LoaderEntrySelected``, lowercased)."""
    return SlotName(BasaltEntry.parse(selected_entry).slot)


def state_from_entries(
    filenames: Iterable[str],
    booted: SlotName | None = None,
    reasons: Mapping[SlotName, str] | None = None,
) -> BootState:
    """The state that the entries on the ESP describe; refuses names Basalt did not write."""
    found: dict[SlotName, Slot] = {}
    seen: dict[SlotName, str] = {}
    for filename in filenames:
        entry = BasaltEntry.parse(filename)
        name = SlotName(entry.slot)
        if name in seen:
            raise BootEntryError(
                f"two boot entries for slot {name}: {seen[name]} and {filename}",
                hint="an interrupted install left one behind; remove the older one",
            )
        seen[name] = filename
        found[name] = slot_from_entry(entry, (reasons or {}).get(name))
    try:
        return BootState(
            found.get(SlotName.A, Slot(SlotName.A)),
            found.get(SlotName.B, Slot(SlotName.B)),
            booted,
        )
    except ValueError as exc:
        raise BootEntryError(f"boot entries are inconsistent: {exc}") from None


def entry_names(state: BootState) -> dict[SlotName, str]:
    """Each non-empty slot's entry file name."""
    return {s.name: e.filename for s in state.slots if (e := s.entry()) is not None}


@dataclass(frozen=True)
class EntryChange:
    """One file operation in ``loader/entries``: create (old None), remove (new None),
    or rename. Apply removals before writing a slot, creations after."""

    slot: SlotName
    old: str | None
    new: str | None


def _reinstalled(before: Slot, after: Slot) -> bool:
    """An install (new image, new generation, fresh counter) rather than a rename."""
    return (
        after.generation != before.generation
        and after.health is SlotHealth.PENDING
        and after.tries_done == 0
    )


def entry_changes(before: BootState, after: BootState) -> list[EntryChange]:
    """The file operations that turn ``before``'s entries into ``after``'s.

    Counting, marking good, and a rollback's new generation are renames of the same
    image's entry; an install removes the slot's old entry and creates the new one.
    """
    old, new = entry_names(before), entry_names(after)
    changes = []
    for slot in SlotName:
        was, now = old.get(slot), new.get(slot)
        if was == now:
            continue
        if was and now and not _reinstalled(before.slot(slot), after.slot(slot)):
            changes.append(EntryChange(slot, was, now))
            continue
        if was:
            changes.append(EntryChange(slot, was, None))
        if now:
            changes.append(EntryChange(slot, None, now))
    return changes


# -- container: JSON ------------------------------------------------------------------------------


def _slot_json(slot: Slot) -> dict[str, Any] | None:
    if slot.version is None:
        return None
    data: dict[str, Any] = {
        "health": slot.health.value,
        "version": slot.version,
        "generation": slot.generation,
    }
    if slot.tries_left is not None:
        data["triesLeft"] = slot.tries_left
        data["triesDone"] = slot.tries_done
    if slot.reason:
        data["reason"] = slot.reason
    return data


def state_to_json(state: BootState) -> str:
    """Canonical JSON (sorted keys, one line, newline-terminated)."""
    document = {
        "format": JSON_FORMAT,
        "booted": state.booted.value if state.booted else None,
        "slots": {s.name.value: _slot_json(s) for s in state.slots},
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n"


def _field(raw: dict[str, Any], where: str, key: str, kind: type, default: Any = None) -> Any:
    value = raw.get(key, default)
    if value is not default and (type(value) is not kind):
        raise ValueError(f"{where}.{key} is not a {kind.__name__}")
    return value


def _slot_from_json(name: SlotName, raw: object) -> Slot:
    if raw is None:
        return Slot(name)
    where = f"slots.{name}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is not an object")
    allowed = {"health", "version", "generation", "triesLeft", "triesDone", "reason"}
    if unknown := sorted(set(raw) - allowed):
        raise ValueError(f"{where} has unknown field(s) {', '.join(unknown)}")
    version = _field(raw, where, "version", str)
    generation = _field(raw, where, "generation", int)
    if version is None or generation is None:
        raise ValueError(f"{where} needs a version and a generation")
    tries_left = _field(raw, where, "triesLeft", int)
    slot = Slot(
        name,
        version,
        generation,
        tries_left,
        _field(raw, where, "triesDone", int, 0),
        _field(raw, where, "reason", str),
    )
    entry = slot.entry()
    assert entry is not None
    if BasaltEntry.parse(entry.filename) != entry:  # the same rules as for entries on metal
        raise ValueError(f"{where} cannot be written as a boot entry ({entry.filename})")
    if raw.get("health") != slot.health.value:
        raise ValueError(f"{where}.health says {raw.get('health')}, its counters say {slot.health}")
    return slot


def state_from_json(text: str, source: str = "boot state") -> BootState:
    """Parse :func:`state_to_json` output; raise :class:`BootEntryError` naming the problem."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("format") != JSON_FORMAT:
            raise ValueError(f"not a format {JSON_FORMAT} boot state")
        slots = raw.get("slots")
        if not isinstance(slots, dict) or set(slots) != {"a", "b"}:
            raise ValueError("slots must have exactly a and b")
        booted = raw.get("booted")
        return BootState(
            _slot_from_json(SlotName.A, slots["a"]),
            _slot_from_json(SlotName.B, slots["b"]),
            None if booted is None else SlotName(booted),
        )
    except (ValueError, TypeError, KeyError, BootEntryError) as exc:
        raise BootEntryError(
            f"{source}: {exc}",
            hint="the launcher and machined write this file; restore it from the other copy",
        ) from None
