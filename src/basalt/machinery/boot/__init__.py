"""A/B slots and boot assessment: the contract machined, the launcher and the imager share.

:mod:`.assessment` decides (pure); :mod:`.entries` is systemd-boot's ordering and entry
naming (pure); :mod:`.codecs` stores a state as ESP entry names (metal) or JSON
(container); :mod:`.esp` is the ESP's file layout; :mod:`.slots` the container
platform's slot directories. The metal backend that applies all of this on a machine is
machined's (:mod:`basalt.machined.boot`).
"""

from .assessment import (
    DEFAULT_TRIES,
    MAX_TRIES,
    Action,
    Boot,
    BootState,
    BootStatus,
    Event,
    GatesFailed,
    GatesPassed,
    GatesTimedOut,
    Install,
    Outcome,
    Rollback,
    Slot,
    SlotHealth,
    SlotName,
    apply,
    boot_order,
    boot_status,
    choose_slot,
    initial_state,
)
from .codecs import (
    EntryChange,
    booted_slot,
    entry_changes,
    entry_names,
    state_from_entries,
    state_from_json,
    state_to_json,
)
from .entries import BasaltEntry, BootEntryError, LoaderEntry, loader_order, strverscmp_improved

__all__ = [
    "DEFAULT_TRIES",
    "MAX_TRIES",
    "Action",
    "BasaltEntry",
    "Boot",
    "BootEntryError",
    "BootState",
    "BootStatus",
    "EntryChange",
    "Event",
    "GatesFailed",
    "GatesPassed",
    "GatesTimedOut",
    "Install",
    "LoaderEntry",
    "Outcome",
    "Rollback",
    "Slot",
    "SlotHealth",
    "SlotName",
    "apply",
    "boot_order",
    "boot_status",
    "booted_slot",
    "choose_slot",
    "entry_changes",
    "entry_names",
    "initial_state",
    "loader_order",
    "state_from_entries",
    "state_from_json",
    "state_to_json",
    "strverscmp_improved",
]
