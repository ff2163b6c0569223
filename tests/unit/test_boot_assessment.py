"""A/B boot assessment: every transition, the fallback, entry names, and properties.

States are written as the systemd-boot entry names that stand for them on metal
(``basalt-GEN-SLOT-VERSION[+LEFT[-DONE]].conf``), so each row reads like the ESP.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from basalt.machinery.boot import (
    MAX_TRIES,
    Action,
    BasaltEntry,
    Boot,
    BootEntryError,
    BootState,
    Event,
    GatesFailed,
    GatesPassed,
    GatesTimedOut,
    Install,
    LoaderEntry,
    Rollback,
    Slot,
    SlotHealth,
    SlotName,
    apply,
    boot_order,
    boot_status,
    booted_slot,
    choose_slot,
    entry_changes,
    entry_names,
    initial_state,
    loader_order,
    state_from_entries,
    state_from_json,
    state_to_json,
    strverscmp_improved,
)
from basalt.machinery.boot.codecs import EntryChange

A = SlotName.A
B = SlotName.B
A1 = "basalt-1-a-0.1.0.conf"
B2 = "basalt-2-b-0.2.0.conf"


def state(*names: str, booted: str | None = None, **reasons: str) -> BootState:
    return state_from_entries(
        names,
        SlotName(booted) if booted else None,
        {SlotName(k): v for k, v in reasons.items()},
    )


def names(s: BootState) -> list[str]:
    return sorted(entry_names(s).values())


# -- transitions, table-driven --------------------------------------------------------------------

# id, entries before, booted, event, entries after, booted after, action, message fragment
TRANSITIONS: list[tuple[str, list[str], str | None, Event, list[str], str | None, Action, str]] = [
    # Boot: what the firmware (or the container launcher) does
    ("boot fresh node", [A1], None, Boot(), [A1], "a", Action.BOOT, "booting slot a (0.1.0)"),
    ("boot empty disk", [], None, Boot(), [], None, Action.REFUSED, "no slot holds an image"),
    ("boot blessed newest", [A1, B2], "a", Boot(), [A1, B2], "b", Action.BOOT, "slot b"),
    ("boot pending first try", [A1, "basalt-2-b-0.2.0+3.conf"], "a", Boot(),
     [A1, "basalt-2-b-0.2.0+2-1.conf"], "b", Action.BOOT, "on trial: try 1 of 3"),
    ("boot pending second try", [A1, "basalt-2-b-0.2.0+2-1.conf"], "b", Boot(),
     [A1, "basalt-2-b-0.2.0+1-2.conf"], "b", Action.BOOT, "try 2 of 3"),
    ("boot pending last try", [A1, "basalt-2-b-0.2.0+1-2.conf"], "b", Boot(),
     [A1, "basalt-2-b-0.2.0+0-3.conf"], "b", Action.BOOT, "try 3 of 3"),
    ("tries exhausted: fall back", [A1, "basalt-2-b-0.2.0+0-3.conf"], "b", Boot(),
     [A1, "basalt-2-b-0.2.0+0-3.conf"], "a", Action.BOOT,
     "booting slot a (0.1.0): slot b (0.2.0) has no boot tries left"),
    ("downgrade boots first", ["basalt-1-a-0.3.0.conf", "basalt-2-b-0.1.0+3.conf"], "a", Boot(),
     ["basalt-1-a-0.3.0.conf", "basalt-2-b-0.1.0+2-1.conf"], "b", Action.BOOT, "try 1 of 3"),
    ("generation 10 beats 9", ["basalt-10-a-0.1.0.conf", "basalt-9-b-0.2.0.conf"], "b", Boot(),
     ["basalt-10-a-0.1.0.conf", "basalt-9-b-0.2.0.conf"], "a", Action.BOOT, "slot a"),
    ("only a bad slot still boots", ["basalt-1-a-0.1.0+0-3.conf"], "a", Boot(),
     ["basalt-1-a-0.1.0+0-4.conf"], "a", Action.BOOT, "no tries left: no other slot"),
    ("both bad: newest boots", ["basalt-1-a-0.1.0+0-3.conf", "basalt-2-b-0.2.0+0-3.conf"], "a",
     Boot(), ["basalt-1-a-0.1.0+0-3.conf", "basalt-2-b-0.2.0+0-4.conf"], "b", Action.BOOT, ""),
    # Install: into the inactive slot, on trial
    ("install to empty slot", [A1], "a", Install("0.2.0"), [A1, "basalt-2-b-0.2.0+3.conf"], "a",
     Action.NONE, "installed 0.2.0 in slot b: it boots next, on trial with 3 tries"),
    ("install with 5 tries", [A1], "a", Install("0.2.0", tries=5),
     [A1, "basalt-2-b-0.2.0+5.conf"], "a", Action.NONE, "5 tries"),
    ("install over previous good", [A1, B2], "b", Install("0.3.0"),
     ["basalt-3-a-0.3.0+3.conf", B2], "b", Action.NONE, "slot a"),
    ("install the same version", [A1], "a", Install("0.1.0"), [A1, "basalt-2-b-0.1.0+3.conf"],
     "a", Action.NONE, ""),
    ("install over pending", [A1, "basalt-2-b-0.2.0+3.conf"], "a", Install("0.2.1"),
     [A1, "basalt-3-b-0.2.1+3.conf"], "a", Action.NONE, ""),
    ("install over bad", [A1, "basalt-2-b-0.2.0+0-3.conf"], "a", Install("0.2.1"),
     [A1, "basalt-3-b-0.2.1+3.conf"], "a", Action.NONE, ""),
    ("install from a bad slot over a bad one",
     ["basalt-1-a-0.1.0+0-3.conf", "basalt-2-b-0.2.0+0-3.conf"], "b", Install("0.2.1"),
     ["basalt-3-a-0.2.1+3.conf", "basalt-2-b-0.2.0+0-3.conf"], "b", Action.NONE, ""),
    ("install refused: only good image", [A1, "basalt-2-b-0.2.0+2-1.conf"], "b",
     Install("0.3.0"), [A1, "basalt-2-b-0.2.0+2-1.conf"], "b", Action.REFUSED,
     "slot a (0.1.0) holds the only good image"),
    ("install refused: nothing booted", [A1], None, Install("0.2.0"), [A1], None,
     Action.REFUSED, "no slot is running"),
    ("install refused: '+' in version", [A1], "a", Install("0.2.0+build1"), [A1], "a",
     Action.REFUSED, "no '+'"),
    ("install refused: no tries", [A1], "a", Install("0.2.0", tries=0), [A1], "a",
     Action.REFUSED, f"tries must be 1-{MAX_TRIES}"),
    # Health gates
    ("gates passed: marked good", [A1, "basalt-2-b-0.2.0+2-1.conf"], "b", GatesPassed(),
     [A1, B2], "b", Action.NONE, "slot b (0.2.0) passed its health gates: marked good"),
    ("gates passed on the last try", [A1, "basalt-2-b-0.2.0+0-3.conf"], "b", GatesPassed(),
     [A1, B2], "b", Action.NONE, "marked good"),
    ("gates passed on good slot", [A1, B2], "b", GatesPassed(), [A1, B2], "b", Action.NONE,
     "already good"),
    ("gates passed, nothing booted", [A1], None, GatesPassed(), [A1], None, Action.REFUSED, ""),
    ("gates failed: retry", [A1, "basalt-2-b-0.2.0+2-1.conf"], "b", GatesFailed("etcd down"),
     [A1, "basalt-2-b-0.2.0+2-1.conf"], "b", Action.REBOOT,
     "failed its health gates: etcd down; rebooting (2 tries left)"),
    ("gates failed: one try left", [A1, "basalt-2-b-0.2.0+1-2.conf"], "b", GatesFailed("x"),
     [A1, "basalt-2-b-0.2.0+1-2.conf"], "b", Action.REBOOT, "(1 try left)"),
    ("gates failed on the last try", [A1, "basalt-2-b-0.2.0+0-3.conf"], "b", GatesFailed("x"),
     [A1, "basalt-2-b-0.2.0+0-3.conf"], "b", Action.REBOOT, "rebooting into slot a (0.1.0)"),
    ("gates failed on good slot", [A1, B2], "b", GatesFailed("x"), [A1, B2], "b", Action.NONE,
     "does not change which slot boots"),
    ("gates failed, nothing better", ["basalt-1-a-0.1.0+0-3.conf"], "a", GatesFailed("x"),
     ["basalt-1-a-0.1.0+0-3.conf"], "a", Action.NONE, "the node stays up to be repaired"),
    ("gates failed, nothing booted", [A1], None, GatesFailed("x"), [A1], None,
     Action.REFUSED, ""),
    ("gates timed out", [A1, "basalt-2-b-0.2.0+1-2.conf"], "b",
     GatesTimedOut(300, ("etcd", "api")), [A1, "basalt-2-b-0.2.0+1-2.conf"], "b", Action.REBOOT,
     "health gates did not pass within 300 s (waiting for etcd, api)"),
    # Rollback
    ("rollback to good", [A1, B2], "b", Rollback(), ["basalt-3-a-0.1.0.conf", B2], "b",
     Action.REBOOT, "rolling back from slot b (0.2.0) to slot a (0.1.0)"),
    ("rollback from pending", [A1, "basalt-2-b-0.2.0+2-1.conf"], "b", Rollback(),
     ["basalt-3-a-0.1.0.conf", "basalt-2-b-0.2.0+0-1.conf"], "b", Action.REBOOT, ""),
    ("rollback refused: empty", [A1], "a", Rollback(), [A1], "a", Action.REFUSED,
     "rollback refused: slot b holds no image"),
    ("rollback refused: pending", [A1, "basalt-2-b-0.2.0+3.conf"], "a", Rollback(),
     [A1, "basalt-2-b-0.2.0+3.conf"], "a", Action.REFUSED,
     "slot b (0.2.0) has not passed its health gates yet"),
    ("rollback refused: bad", [A1, "basalt-2-b-0.2.0+0-3.conf"], "a", Rollback(),
     [A1, "basalt-2-b-0.2.0+0-3.conf"], "a", Action.REFUSED,
     "slot b (0.2.0) failed its health gates"),
    ("rollback refused: nothing booted", [A1, B2], None, Rollback(), [A1, B2], None,
     Action.REFUSED, ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("before", "booted", "event", "after", "booted_after", "action", "message"),
    [pytest.param(*row[1:], id=row[0]) for row in TRANSITIONS],
)
def test_transition(
    before: list[str],
    booted: str | None,
    event: Event,
    after: list[str],
    booted_after: str | None,
    action: Action,
    message: str,
) -> None:
    start = state(*before, booted=booted)
    outcome = apply(start, event)
    assert outcome.action is action, outcome.message
    assert message in outcome.message
    assert names(outcome.state) == sorted(after)
    assert outcome.state.booted == (SlotName(booted_after) if booted_after else None)
    if action is Action.REFUSED:
        assert outcome.refused and outcome.state is start


def test_every_event_kind_is_in_the_table() -> None:
    kinds = {type(row[3]) for row in TRANSITIONS}
    assert kinds == {Boot, Install, GatesPassed, GatesFailed, GatesTimedOut, Rollback}


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (GatesFailed("etcd member not healthy"), "etcd member not healthy"),
        (GatesTimedOut(90), "health gates did not pass within 90 s"),
    ],
)
def test_failed_gates_record_the_reason_on_the_slot(event: Event, reason: str) -> None:
    outcome = apply(state(A1, "basalt-2-b-0.2.0+2-1.conf", booted="b"), event)
    assert outcome.state.b.reason == reason
    assert outcome.state.a.reason is None


def test_passing_gates_clears_an_earlier_failure() -> None:
    failed = apply(state(A1, "basalt-2-b-0.2.0+2-1.conf", booted="b"), GatesFailed("x")).state
    assert apply(failed, GatesPassed()).state.b == Slot(B, "0.2.0", 2)


def test_rollback_refusal_names_the_failure() -> None:
    start = state(A1, "basalt-2-b-0.2.0+0-3.conf", booted="a", b="kubelet not ready")
    assert "slot b (0.2.0) failed: kubelet not ready" in apply(start, Rollback()).message


# -- the whole story: upgrade, broken upgrade, fallback, rollback ---------------------------------


def run(start: BootState, *events: Event) -> BootState:
    for event in events:
        outcome = apply(start, event)
        assert not outcome.refused, outcome.message
        start = outcome.state
    return start


def test_broken_upgrade_falls_back_and_says_why() -> None:
    failed = GatesFailed("etcd member not healthy")
    s = run(initial_state("0.1.0"), Boot(), GatesPassed(), Install("0.2.0"))
    for _ in range(3):
        s = run(s, Boot(), failed)
        assert s.booted is B
    s = run(s, Boot())
    assert s.booted is A
    status = boot_status(s)
    assert status is not None
    assert (status.current, status.previous, status.fell_back_from) == ("a", "b", "b")
    assert status.reason == "etcd member not healthy; its 3 boot tries ran out"
    assert status.summary() == (
        "running slot a (0.1.0); fell back from slot b (0.2.0) because "
        "etcd member not healthy; its 3 boot tries ran out"
    )
    # and it keeps booting a, without touching counters
    assert run(s, Boot()) == s


def test_good_upgrade_then_rollback_then_rollback_again() -> None:
    s = run(initial_state("0.1.0"), Boot(), Install("0.2.0"), Boot(), GatesPassed())
    status = boot_status(s)
    assert status is not None
    assert (status.current, status.previous, status.on_trial) == ("b", "a", False)
    assert status.fell_back_from is None and status.reason is None
    s = run(s, Rollback(), Boot())
    status = boot_status(s)
    assert status is not None and status.current == "a"
    assert status.reason == "rolled back from slot b (0.2.0): rollback requested"
    assert status.fell_back_from is None
    s = run(s, Rollback(), Boot())
    assert s.booted is B and s.a.health is s.b.health is SlotHealth.GOOD


def test_status_while_on_trial() -> None:
    s = run(initial_state("0.1.0"), Boot(), Install("0.2.0"), Boot())
    status = boot_status(s)
    assert status is not None and status.on_trial
    assert status.summary() == "running slot b (0.2.0), on trial"
    assert boot_status(initial_state("0.1.0")) is None


# -- entry names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("basalt-1-a-0.1.0.conf", (1, "a", "0.1.0", None, 0)),
        ("basalt-2-b-0.2.0+3.conf", (2, "b", "0.2.0", 3, 0)),
        ("basalt-2-b-0.2.0+2-1.conf", (2, "b", "0.2.0", 2, 1)),
        ("basalt-2-b-0.2.0+0-3.conf", (2, "b", "0.2.0", 0, 3)),
        ("basalt-12-a-1.0.0-rc.1.conf", (12, "a", "1.0.0-rc.1", None, 0)),
        ("basalt-3-a-1.0.0-rc.1+1-2.conf", (3, "a", "1.0.0-rc.1", 1, 2)),
        ("basalt-4-b-2.0~beta_1+5.conf", (4, "b", "2.0~beta_1", 5, 0)),
    ],
)
def test_entry_names_round_trip(name: str, fields: tuple[object, ...]) -> None:
    entry = BasaltEntry.parse(name)
    assert (
        entry.generation,
        entry.slot,
        entry.version,
        entry.tries_left,
        entry.tries_done,
    ) == fields
    assert entry.filename == name


def test_a_zero_done_counter_is_written_the_way_systemd_boot_starts() -> None:
    assert BasaltEntry.parse("basalt-2-b-0.2.0+3-0.conf").filename == "basalt-2-b-0.2.0+3.conf"


@pytest.mark.parametrize(
    "name",
    [
        "basalt-0-a-0.1.0.conf",  # generation starts at 1
        "basalt-01-a-0.1.0.conf",
        "basalt-1-c-0.1.0.conf",
        "basalt-1-a-.conf",
        "basalt-1-a-0.1.0+x.conf",
        "basalt-1-a-0.1.0+3-.conf",
        "basalt-1-a-0.1.0+3+1.conf",
        "basalt-1-a-0.1.0.CONF",
        "basalt-1-a-0.1.0",
        "basalt-1-a-V1.conf",
        "basalt-a-0.1.0.conf",
        "debian.conf",
    ],
)
def test_foreign_entry_names_are_refused(name: str) -> None:
    with pytest.raises(BootEntryError, match="not one Basalt writes"):
        BasaltEntry.parse(name)


def test_two_entries_for_one_slot_are_refused() -> None:
    with pytest.raises(BootEntryError, match="two boot entries for slot b"):
        state(A1, B2, "basalt-3-b-0.3.0+3.conf")


def test_booted_slot_comes_from_the_selected_entry() -> None:
    # LoaderEntrySelected holds the name as it was when booted, before the counter moved.
    assert booted_slot("basalt-2-b-0.2.0+3.conf") is B
    assert booted_slot(A1) is A


# -- systemd-boot itself --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "left", "done", "next_name", "blessed"),
    [
        ("foobar+3.conf", 3, 0, "foobar+2-1.conf", "foobar.conf"),
        ("foobar+2-1.conf", 2, 1, "foobar+1-2.conf", "foobar.conf"),
        ("foobar+0-3.conf", 0, 3, "foobar+0-4.conf", "foobar.conf"),
        ("foobar+4-0.conf", 4, 0, "foobar+3-1.conf", "foobar.conf"),
        ("foo+bar+3.conf", 3, 0, "foo+bar+2-1.conf", "foo+bar.conf"),  # the last '+' counts
        ("foo+3x.conf", None, None, "foo+3x.conf", "foo+3x.conf"),  # counter mid-name
        ("foo+3.CONF", None, None, "foo+3.CONF", "foo+3.CONF"),
        ("foo+.conf", None, None, "foo+.conf", "foo+.conf"),
        ("foo.conf", None, None, "foo.conf", "foo.conf"),
        ("foo+3000000000.conf", None, None, "foo+3000000000.conf", "foo+3000000000.conf"),
    ],
)
def test_loader_counter_parsing(
    name: str, left: int | None, done: int | None, next_name: str, blessed: str
) -> None:
    entry = LoaderEntry.parse(name)
    assert (entry.tries_left, entry.tries_done) == (left, done)
    assert entry.next_name() == next_name
    assert entry.blessed_name() == blessed


# systemd's own example, oldest first (string-util-fundamental.c).
VERSION_ORDER = [
    "122.1",
    "123~rc1-1",
    "123",
    "123-a",
    "123-a.1",
    "123-1",
    "123-1.1",
    "123^post1",
    "123.a-1",
    "123.1-1",
    "123a-1",
    "124-1",
]


def test_strverscmp_improved_orders_systemds_examples() -> None:
    for i, older in enumerate(VERSION_ORDER):
        for newer in VERSION_ORDER[i + 1 :]:
            assert strverscmp_improved(older, newer) == -1, (older, newer)
            assert strverscmp_improved(newer, older) == 1, (newer, older)
        assert strverscmp_improved(older, older) == 0


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("00123", "123", 0),
        ("123_a", "123a", 0),  # unsupported characters only separate
        ("a", "", 1),
        ("", "", 0),
        ("0.9", "0.10", -1),
        ("1.0~rc1", "1.0", -1),
    ],
)
def test_strverscmp_improved_cases(a: str, b: str, expected: int) -> None:
    assert strverscmp_improved(a, b) == expected


@pytest.mark.parametrize(
    ("entries", "first"),
    [
        (["basalt-1-a-0.1.0.conf", "basalt-2-b-0.2.0+3.conf"], "basalt-2-b-0.2.0+3.conf"),
        (["basalt-1-a-0.1.0.conf", "basalt-2-b-0.2.0+0-3.conf"], "basalt-1-a-0.1.0.conf"),
        (["basalt-1-a-0.1.0+0-9.conf", "basalt-2-b-0.2.0+0-3.conf"], "basalt-2-b-0.2.0+0-3.conf"),
        (["basalt-1-a-0.1.0.conf", "basalt-2-b-0.2.0.conf"], "basalt-2-b-0.2.0.conf"),
        (["basalt-9-a-0.1.0.conf", "basalt-10-b-0.0.1.conf"], "basalt-10-b-0.0.1.conf"),
        # same id: more tries left first, then fewer done
        (["x+1-2.conf", "x+2-1.conf"], "x+2-1.conf"),
        # BOOT-NOTES: version names sort newest first; +0 sorts last
        (["basalt-0.1.0.conf", "basalt-0.2.0+3.conf"], "basalt-0.2.0+3.conf"),
        (["basalt-0.1.0.conf", "basalt-0.2.0+0-3.conf"], "basalt-0.1.0.conf"),
    ],
)
def test_loader_order(entries: list[str], first: str) -> None:
    assert loader_order(entries)[0] == first
    assert loader_order(reversed(entries))[0] == first


# -- stored forms ---------------------------------------------------------------------------------


def test_json_state_round_trip_keeps_reasons() -> None:
    s = state(A1, "basalt-2-b-0.2.0+0-3.conf", booted="a", b="etcd down")
    text = state_to_json(s)
    assert state_from_json(text) == s
    assert '"reason":"etcd down"' in text and text.endswith("\n")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "Expecting value"),
        ('{"format":2,"slots":{}}', "not a format 1 boot state"),
        ('{"format":1,"slots":{"a":null}}', "exactly a and b"),
        ('{"format":1,"booted":"b","slots":{"a":null,"b":null}}', "booted slot b is empty"),
        (
            '{"format":1,"slots":{"a":{"health":"pending","version":"0.1.0","generation":1},'
            '"b":null}}',
            "health says pending, its counters say good",
        ),
        (
            '{"format":1,"slots":{"a":{"health":"good","version":"0.1.0","generation":"1"},'
            '"b":null}}',
            "generation is not a int",
        ),
        (
            '{"format":1,"slots":{"a":{"health":"good","version":"0.1+0","generation":1},'
            '"b":null}}',
            "no '+'",
        ),
        (
            '{"format":1,"slots":{"a":{"health":"good","version":"0.1.0","generation":1,'
            '"extra":1},"b":null}}',
            "unknown field(s) extra",
        ),
        (
            '{"format":1,"slots":{"a":{"health":"good","version":"0.1.0","generation":1},'
            '"b":{"health":"good","version":"0.2.0","generation":1}}}',
            "same generation",
        ),
    ],
)
def test_bad_json_state_is_refused(text: str, problem: str) -> None:
    with pytest.raises(BootEntryError) as caught:
        state_from_json(text, "slots/boot.json")
    assert problem in str(caught.value) and "slots/boot.json" in str(caught.value)


@pytest.mark.parametrize(
    ("before", "booted", "event", "changes"),
    [
        (
            [A1, "basalt-2-b-0.2.0+3.conf"],
            "a",
            Boot(),
            [EntryChange(B, "basalt-2-b-0.2.0+3.conf", "basalt-2-b-0.2.0+2-1.conf")],
        ),
        (
            [A1, "basalt-2-b-0.2.0+2-1.conf"],
            "b",
            GatesPassed(),
            [EntryChange(B, "basalt-2-b-0.2.0+2-1.conf", B2)],
        ),
        ([A1], "a", Install("0.2.0"), [EntryChange(B, None, "basalt-2-b-0.2.0+3.conf")]),
        (
            [A1, B2],
            "b",
            Install("0.3.0"),
            [EntryChange(A, A1, None), EntryChange(A, None, "basalt-3-a-0.3.0+3.conf")],
        ),
        (
            [A1, "basalt-2-b-0.2.0+3.conf"],
            "a",
            Install("0.2.0"),  # the same version again: still a new image
            [
                EntryChange(B, "basalt-2-b-0.2.0+3.conf", None),
                EntryChange(B, None, "basalt-3-b-0.2.0+3.conf"),
            ],
        ),
        ([A1, B2], "b", Rollback(), [EntryChange(A, A1, "basalt-3-a-0.1.0.conf")]),
        ([A1, B2], "b", GatesFailed("x"), []),
    ],
)
def test_entry_changes(
    before: list[str], booted: str, event: Event, changes: list[EntryChange]
) -> None:
    start = state(*before, booted=booted)
    assert entry_changes(start, apply(start, event).state) == changes


# -- properties -----------------------------------------------------------------------------------

events = st.one_of(
    st.builds(
        Install,
        st.sampled_from(["0.1.0", "0.2.0", "0.3.0-rc.1", "1.0.0"]),
        st.integers(1, 4),
    ),
    st.just(Boot()),
    st.just(GatesPassed()),
    st.builds(GatesFailed, st.sampled_from(["etcd down", "api not serving"])),
    st.builds(GatesTimedOut, st.sampled_from([30.0, 300.0])),
    st.just(Rollback()),
)
histories = st.lists(events, max_size=40)


def reachable(history: list[Event]) -> list[BootState]:
    """Every state along ``history`` from a freshly installed, booted node."""
    s = apply(initial_state("0.1.0"), Boot()).state
    seen = [s]
    for event in history:
        s = apply(s, event).state
        seen.append(s)
    return seen


def without_reasons(s: BootState) -> BootState:
    return BootState(replace(s.a, reason=None), replace(s.b, reason=None), s.booted)


@settings(max_examples=400, deadline=None)
@given(histories)
def test_a_good_slot_is_never_lost_and_never_passed_over(history: list[Event]) -> None:
    for s in reachable(history):
        assert any(slot.health is SlotHealth.GOOD for slot in s.slots), s
        chosen = choose_slot(s)
        assert chosen is not None
        assert chosen.health in (SlotHealth.GOOD, SlotHealth.PENDING), s


@settings(max_examples=300, deadline=None)
@given(histories)
def test_failing_gates_always_end_on_a_good_slot(history: list[Event]) -> None:
    s = reachable(history)[-1]
    for _ in range(MAX_TRIES + 2):
        s = apply(s, Boot()).state
        assert s.booted is not None
        if s.slot(s.booted).health is SlotHealth.GOOD:
            break
        s = apply(s, GatesFailed("broken")).state
    assert s.booted is not None and s.slot(s.booted).health is SlotHealth.GOOD


@settings(max_examples=300, deadline=None)
@given(histories)
def test_metal_and_container_forms_agree_with_the_model(history: list[Event]) -> None:
    for s in reachable(history):
        assert state_from_json(state_to_json(s)) == s
        assert state_from_entries(entry_names(s).values(), s.booted) == without_reasons(s)
        # Booting by the names alone, as systemd-boot does on metal, gives the same state.
        filenames = list(entry_names(s).values())
        chosen = loader_order(filenames)[0]
        renamed = [LoaderEntry.parse(n).next_name() if n == chosen else n for n in filenames]
        firmware = state_from_entries(renamed, booted_slot(chosen))
        assert firmware == without_reasons(apply(s, Boot()).state)


@settings(max_examples=300, deadline=None)
@given(histories)
def test_boot_order_is_newest_with_tries_left_first(history: list[Event]) -> None:
    for s in reachable(history):
        spec = sorted(
            (slot for slot in s.slots if slot.version),
            key=lambda slot: (slot.tries_left == 0, -slot.generation),
        )
        assert boot_order(s) == spec


version_chars = st.text(alphabet="0123456789abcxyz.-~^_+", max_size=12)


@settings(max_examples=500, deadline=None)
@given(version_chars, version_chars)
def test_strverscmp_is_antisymmetric(a: str, b: str) -> None:
    assert strverscmp_improved(a, b) == -strverscmp_improved(b, a)
    assert strverscmp_improved(a, a) == 0


@given(st.integers(0, 10**12), st.integers(0, 10**12))
def test_strverscmp_compares_numbers_as_numbers(m: int, n: int) -> None:
    assert strverscmp_improved(str(m), str(n)) == (m > n) - (m < n)


@given(
    st.integers(1, 10**9 - 1),
    st.sampled_from("ab"),
    st.from_regex(r"[0-9a-z][0-9a-z._~-]{0,20}", fullmatch=True),
    st.one_of(st.none(), st.integers(0, 999)),
    st.integers(1, 999),
)
def test_entry_names_round_trip_for_any_slot(
    generation: int, slot: str, version: str, left: int | None, done: int
) -> None:
    entry = BasaltEntry(generation, slot, version, left, done if left is not None else 0)
    assert BasaltEntry.parse(entry.filename) == entry
    loader = LoaderEntry.parse(entry.filename)
    assert (loader.tries_left, loader.tries_done or 0) == (entry.tries_left, entry.tries_done)
