"""A/B boot assessment: which slot boots, how tries are counted, when a slot is good.

Pure: no I/O, no clock. Platforms supply storage only. On metal the state *is* the
systemd-boot entry names on the ESP (plus failure reasons in META); in container mode
it is a small JSON document, and the process launcher plays the firmware by calling
:func:`apply` with :class:`Boot` before it starts a slot. Either way the boot order is
systemd-boot's own (:mod:`.entries`), so both platforms make the same decisions.

A slot is ``empty`` (no image), ``good`` (passed its health gates: no boot counter),
``pending`` (on trial: ``tries_left`` > 0) or ``bad`` (no tries left). Events:

- :class:`Install` writes the inactive slot: pending with N tries, newest generation;
  refused when that would overwrite the only good image.
- :class:`Boot` is the firmware: pick the first slot in systemd-boot order and count
  the try (left-1, done+1). A pending slot sorts first; with no tries left it sorts
  last, so the previous good slot boots: the fallback.
- :class:`GatesPassed` marks the running slot good (the counter goes: the rename).
- :class:`GatesFailed` / :class:`GatesTimedOut` on a slot on trial ask for a reboot.
- :class:`Rollback` makes the other slot boot next, only if it holds a good image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from basalt.machinery.images.manifest import check_version

from .entries import INT_MAX, BasaltEntry, loader_order

DEFAULT_TRIES = 3
MAX_TRIES = 16


class SlotName(StrEnum):
    A = "a"
    B = "b"

    @property
    def other(self) -> SlotName:
        return SlotName.B if self is SlotName.A else SlotName.A


class SlotHealth(StrEnum):
    EMPTY = "empty"
    GOOD = "good"
    PENDING = "pending"
    BAD = "bad"


@dataclass(frozen=True)
class Slot:
    """One slot. ``tries_left`` None means no boot counter: the image is good.

    ``generation`` orders installs (and rollbacks): the highest boots first among
    slots with tries left. ``reason`` says why the slot stopped being the one that
    boots (its last failed health gate, or a rollback); it is not in entry names.
    """

    name: SlotName
    version: str | None = None
    generation: int = 0
    tries_left: int | None = None
    tries_done: int = 0
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.version is None:
            if (self.generation, self.tries_left, self.tries_done) != (0, None, 0):
                raise ValueError(f"empty slot {self.name} has counters")
            return
        if problem := check_version(self.version):
            raise ValueError(f"slot {self.name}: {problem}")
        if self.generation < 1:
            raise ValueError(f"slot {self.name} holds an image but has no generation")
        if self.tries_left is not None and not 0 <= self.tries_left <= INT_MAX:
            raise ValueError(f"slot {self.name}: tries_left {self.tries_left} is out of range")
        if not 0 <= self.tries_done <= INT_MAX or (self.tries_left is None and self.tries_done):
            raise ValueError(f"slot {self.name}: tries_done {self.tries_done} is out of range")

    @property
    def health(self) -> SlotHealth:
        if self.version is None:
            return SlotHealth.EMPTY
        if self.tries_left is None:
            return SlotHealth.GOOD
        return SlotHealth.PENDING if self.tries_left > 0 else SlotHealth.BAD

    @property
    def label(self) -> str:
        return f"slot {self.name}" + (f" ({self.version})" if self.version else "")

    def entry(self) -> BasaltEntry | None:
        """This slot's systemd-boot entry (None when empty)."""
        if self.version is None:
            return None
        return BasaltEntry(
            self.generation, self.name.value, self.version, self.tries_left, self.tries_done
        )


@dataclass(frozen=True)
class BootState:
    """Both slots, and which one is running (None before the loader picked one)."""

    a: Slot
    b: Slot
    booted: SlotName | None = None

    def __post_init__(self) -> None:
        if self.a.name is not SlotName.A or self.b.name is not SlotName.B:
            raise ValueError("slots must be a and b, in that order")
        if self.booted is not None and self.slot(self.booted).version is None:
            raise ValueError(f"booted slot {self.booted} is empty")
        gens = {self.a.generation, self.b.generation} - {0}
        if self.a.version and self.b.version and len(gens) < 2:
            raise ValueError("both slots have the same generation")

    def slot(self, name: SlotName) -> Slot:
        return self.a if name is SlotName.A else self.b

    def with_slot(self, slot: Slot) -> BootState:
        return replace(self, a=slot) if slot.name is SlotName.A else replace(self, b=slot)

    @property
    def slots(self) -> tuple[Slot, Slot]:
        return (self.a, self.b)

    @property
    def next_generation(self) -> int:
        return max(self.a.generation, self.b.generation) + 1


def initial_state(version: str) -> BootState:
    """A freshly installed node: the installer's image in slot a, good, not yet booted."""
    return BootState(Slot(SlotName.A, version, 1), Slot(SlotName.B))


# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Install:
    """A verified image was written to the inactive slot; it boots next, on trial."""

    version: str
    tries: int = DEFAULT_TRIES


@dataclass(frozen=True)
class Boot:
    """The firmware (or container launcher) boots: pick a slot and count the try."""


@dataclass(frozen=True)
class GatesPassed:
    """Every health gate passed within the timeout on the running slot."""


@dataclass(frozen=True)
class GatesFailed:
    """A health gate failed on the running slot; ``reason`` says which and how."""

    reason: str


@dataclass(frozen=True)
class GatesTimedOut:
    """The health gates did not all pass within ``timeout_seconds``."""

    timeout_seconds: float
    waiting_for: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        waiting = f" (waiting for {', '.join(self.waiting_for)})" if self.waiting_for else ""
        return f"health gates did not pass within {self.timeout_seconds:g} s{waiting}"


@dataclass(frozen=True)
class Rollback:
    """The user asked to boot the other slot."""


Event = Install | Boot | GatesPassed | GatesFailed | GatesTimedOut | Rollback


class Action(StrEnum):
    NONE = "none"  # persist the state; nothing else to do
    BOOT = "boot"  # start the slot in Outcome.slot (the loader's decision)
    REBOOT = "reboot"  # persist the state, then reboot the node
    REFUSED = "refused"  # the event was refused; the state is unchanged


@dataclass(frozen=True)
class Outcome:
    state: BootState
    action: Action
    message: str
    slot: SlotName | None = None

    @property
    def refused(self) -> bool:
        return self.action is Action.REFUSED


def _refuse(state: BootState, message: str) -> Outcome:
    return Outcome(state, Action.REFUSED, message)


# -- the loader's choice --------------------------------------------------------------------------


def boot_order(state: BootState) -> list[Slot]:
    """Slots holding an image, in systemd-boot's order; the first one boots."""
    by_name = {e.filename: s for s in state.slots if (e := s.entry()) is not None}
    return [by_name[name] for name in loader_order(by_name)]


def choose_slot(state: BootState) -> Slot | None:
    """The slot the loader boots next, or None when no slot holds an image."""
    order = boot_order(state)
    return order[0] if order else None


def _boot(state: BootState) -> Outcome:
    chosen = choose_slot(state)
    if chosen is None:
        return _refuse(state, "no slot holds an image: nothing to boot")
    other = state.slot(chosen.name.other)
    if chosen.tries_left is None:
        message = f"booting {chosen.label}"
        if other.health is SlotHealth.BAD and other.generation > chosen.generation:
            message += f": {other.label} has no boot tries left"
        booted = chosen
    else:
        booted = replace(
            chosen,
            tries_left=max(chosen.tries_left - 1, 0),
            tries_done=min(chosen.tries_done + 1, INT_MAX),
        )
        if chosen.tries_left > 0:
            total = chosen.tries_left + chosen.tries_done
            message = f"booting {chosen.label} on trial: try {booted.tries_done} of {total}"
        else:
            message = f"booting {chosen.label} with no tries left: no other slot holds a good image"
    return Outcome(
        replace(state.with_slot(booted), booted=chosen.name), Action.BOOT, message, chosen.name
    )


# -- transitions ----------------------------------------------------------------------------------


def _install(state: BootState, event: Install) -> Outcome:
    problem = check_version(event.version)
    if problem:
        return _refuse(state, f"install refused: {problem}")
    if not 1 <= event.tries <= MAX_TRIES:
        return _refuse(state, f"install refused: tries must be 1-{MAX_TRIES}, not {event.tries}")
    if state.booted is None:
        return _refuse(state, "install refused: no slot is running, so none is inactive")
    running, target = state.slot(state.booted), state.slot(state.booted.other)
    if target.health is SlotHealth.GOOD and running.health is not SlotHealth.GOOD:
        return _refuse(
            state,
            f"install refused: {target.label} holds the only good image and the running "
            f"{running.label} has not passed its health gates; wait until it is marked "
            "good, or roll back",
        )
    written = Slot(target.name, event.version, state.next_generation, event.tries, 0)
    return Outcome(
        state.with_slot(written),
        Action.NONE,
        f"installed {event.version} in slot {target.name}: it boots next, on trial with "
        f"{event.tries} tries",
        target.name,
    )


def _gates_passed(state: BootState) -> Outcome:
    if state.booted is None:
        return _refuse(state, "no slot is running")
    running = state.slot(state.booted)
    if running.health is SlotHealth.GOOD:
        return Outcome(state, Action.NONE, f"{running.label} is already good", running.name)
    good = replace(running, tries_left=None, tries_done=0, reason=None)
    return Outcome(
        state.with_slot(good),
        Action.NONE,
        f"{running.label} passed its health gates: marked good",
        running.name,
    )


def _gates_failed(state: BootState, reason: str) -> Outcome:
    if state.booted is None:
        return _refuse(state, "no slot is running")
    running = state.slot(state.booted)
    other = state.slot(running.name.other)
    if running.health is SlotHealth.GOOD:
        return Outcome(
            state,
            Action.NONE,
            f"{running.label} is good; a failed health gate ({reason}) does not change "
            "which slot boots",
            running.name,
        )
    failed = state.with_slot(replace(running, reason=reason))
    if running.health is SlotHealth.PENDING:
        left = running.tries_left
        return Outcome(
            failed,
            Action.REBOOT,
            f"{running.label} failed its health gates: {reason}; rebooting "
            f"({left} {'try' if left == 1 else 'tries'} left)",
            running.name,
        )
    if other.health is SlotHealth.GOOD:
        return Outcome(
            failed,
            Action.REBOOT,
            f"{running.label} failed its health gates: {reason}; no tries left, "
            f"rebooting into {other.label}",
            running.name,
        )
    return Outcome(
        failed,
        Action.NONE,
        f"{running.label} failed its health gates: {reason}; no other slot holds a good "
        "image, so the node stays up to be repaired",
        running.name,
    )


def _rollback(state: BootState) -> Outcome:
    if state.booted is None:
        return _refuse(state, "rollback refused: no slot is running")
    running, other = state.slot(state.booted), state.slot(state.booted.other)
    why = {
        SlotHealth.EMPTY: f"slot {other.name} holds no image",
        SlotHealth.PENDING: f"{other.label} has not passed its health gates yet",
        SlotHealth.BAD: f"{other.label} failed"
        + (f": {other.reason}" if other.reason else " its health gates"),
    }
    if other.health is not SlotHealth.GOOD:
        return _refuse(state, f"rollback refused: {why[other.health]}")
    target = replace(other, generation=state.next_generation, reason=None)
    left = replace(running, reason="rollback requested")
    if running.health is SlotHealth.PENDING:
        left = replace(left, tries_left=0)  # it will not be tried again
    return Outcome(
        state.with_slot(target).with_slot(left),
        Action.REBOOT,
        f"rolling back from {running.label} to {other.label}",
        other.name,
    )


def apply(state: BootState, event: Event) -> Outcome:
    """The one transition function: the new state and what the platform must do."""
    match event:
        case Install():
            return _install(state, event)
        case Boot():
            return _boot(state)
        case GatesPassed():
            return _gates_passed(state)
        case GatesFailed(reason=reason):
            return _gates_failed(state, reason)
        case GatesTimedOut():
            return _gates_failed(state, event.reason)
        case Rollback():
            return _rollback(state)


# -- what the node reports ------------------------------------------------------------------------


@dataclass
class BootStatus:
    """Which slot runs, which one it would roll back to, and whether it fell back (and why)."""

    current: str
    current_version: str
    previous: str | None = None
    previous_version: str | None = None
    fell_back_from: str | None = None
    reason: str | None = None
    on_trial: bool = False

    def summary(self) -> str:
        text = f"running slot {self.current} ({self.current_version})"
        if self.on_trial:
            text += ", on trial"
        if self.fell_back_from:
            version = f" ({self.previous_version})" if self.previous_version else ""
            text += f"; fell back from slot {self.fell_back_from}{version} because {self.reason}"
        elif self.reason:
            text += f"; {self.reason}"
        return text


def boot_status(state: BootState) -> BootStatus | None:
    """The status to publish; None before a slot has booted."""
    if state.booted is None:
        return None
    current, other = state.slot(state.booted), state.slot(state.booted.other)
    assert current.version is not None
    status = BootStatus(
        current.name.value,
        current.version,
        on_trial=current.health is not SlotHealth.GOOD,
    )
    if other.version is not None:
        status.previous, status.previous_version = other.name.value, other.version
    if other.health is SlotHealth.BAD and other.generation > current.generation:
        status.fell_back_from = other.name.value
        failure = other.reason or "it did not pass its health gates"
        status.reason = f"{failure}; its {other.tries_done} boot tries ran out"
    elif other.reason and other.generation < current.generation:
        status.reason = f"rolled back from {other.label}: {other.reason}"
    return status
