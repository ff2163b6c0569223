"""The sequencer: phase order, concurrency, conditions, one sequence at a time, takeover."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from basalt.machined.runtime.sequencer import (
    TAKEOVER,
    Sequence,
    SequenceConflictError,
    Sequencer,
    sequence,
)

T = TypeVar("T")
NAMES = ("boot", "apply-config", "reboot", "shutdown", "reset")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 5))


@dataclass
class Node:
    """What the tasks below touch: a log of what ran, and a gate that blocks ``hold``."""

    log: list[str] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    flag: bool = False


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def __call__(self, seq: str, phase: str, message: str) -> None:
        self.events.append((seq, phase, message))

    def of(self, name: str) -> list[tuple[str, str]]:
        return [(phase, message) for seq, phase, message in self.events if seq == name]


def step(label: str) -> Any:
    async def task(node: Node, request: Any) -> None:
        node.log.append(f"{label} start")
        await asyncio.sleep(0)
        node.log.append(f"{label} end")

    task.__name__ = label
    return task


async def hold(node: Node, request: Any) -> None:
    node.log.append("hold")
    await node.gate.wait()


async def boom(node: Node, request: Any) -> None:
    raise ValueError("disk on fire")


def flag_set(node: Node, request: Any) -> bool:
    return node.flag


def blocked(name: str) -> Sequence[Node]:
    """A sequence that stays in its first phase until the node's gate opens."""
    return sequence(name).then("wait", hold).then("done", step(f"{name}-done"))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_phases_run_in_order() -> None:
    async def scenario() -> list[str]:
        node = Node()
        seq = sequence("boot").then("one", step("a"), step("b")).then("two", step("c"))
        await Sequencer(node, Recorder()).start(seq)
        return node.log

    log = run(scenario())
    assert set(log[:4]) == {"a start", "b start", "a end", "b end"}
    assert log[4:] == ["c start", "c end"]


def test_tasks_of_a_phase_run_concurrently() -> None:
    """Each task waits for the other to have started: run one after the other, they hang."""

    async def scenario() -> None:
        node = Node()
        first, second = asyncio.Event(), asyncio.Event()

        async def left(node: Node, request: Any) -> None:
            first.set()
            await second.wait()

        async def right(node: Node, request: Any) -> None:
            second.set()
            await first.wait()

        task = Sequencer(node, Recorder()).start(sequence("boot").then("both", left, right))
        await asyncio.wait_for(task, 1)

    run(scenario())


def test_tasks_receive_the_node_and_request() -> None:
    seen: list[tuple[Any, Any]] = []

    async def look(node: Node, request: Any) -> None:
        seen.append((node, request))

    async def scenario() -> Node:
        node = Node()
        await Sequencer(node, Recorder()).start(sequence("reset").then("look", look), "req")
        return node

    node = run(scenario())
    assert seen == [(node, "req")]


@pytest.mark.parametrize(("flag", "ran"), [(True, ["a", "b", "c"]), (False, ["a", "c"])])
def test_when_condition_skips_a_phase(flag: bool, ran: list[str]) -> None:
    async def scenario() -> tuple[list[str], list[tuple[str, str]]]:
        node = Node(flag=flag)
        recorder = Recorder()
        seq = (
            sequence("boot")
            .then("first", step("a"))
            .then("maybe", step("b"), when=flag_set)
            .then("last", step("c"))
        )
        await Sequencer(node, recorder).start(seq)
        return node.log, recorder.of("boot")

    log, events = run(scenario())
    assert [line.split()[0] for line in log if line.endswith("start")] == ran
    phases = [phase for phase, message in events if message == "phase started"]
    assert phases == [{"a": "first", "b": "maybe", "c": "last"}[r] for r in ran]


def test_when_condition_sees_the_request() -> None:
    def asked(node: Node, request: Any) -> bool:
        return bool(request)

    async def scenario(request: Any) -> list[str]:
        node = Node()
        seq = sequence("reset").then("leave", step("leave"), when=asked)
        await Sequencer(node, Recorder()).start(seq, request)
        return node.log

    assert run(scenario(True)) == ["leave start", "leave end"]
    assert run(scenario(False)) == []


def test_describe_lists_phases_tasks_and_conditions() -> None:
    seq = (
        sequence("boot")
        .then("prepare", step("mount"), step("load"))
        .then("maintenance", hold, when=flag_set)
        .then("running", step("mark"))
    )
    assert seq.describe() == [
        "prepare: mount, load",
        "maintenance: hold [when flag_set]",
        "running: mark",
    ]
    assert sequence("empty").describe() == []


def test_then_builds_a_new_sequence() -> None:
    base = sequence("boot").then("one", step("a"))
    longer = base.then("two", step("b"))
    assert [p.name for p in base.phases] == ["one"]
    assert [p.name for p in longer.phases] == ["one", "two"]


def test_events_of_a_successful_sequence_in_order() -> None:
    async def scenario() -> list[tuple[str, str, str]]:
        recorder = Recorder()
        seq = sequence("reboot").then("stage", step("a")).then("stop", step("b"), step("c"))
        await Sequencer(Node(), recorder).start(seq)
        return recorder.events

    assert run(scenario()) == [
        ("reboot", "", "started"),
        ("reboot", "stage", "phase started"),
        ("reboot", "stop", "phase started"),
        ("reboot", "", "finished"),
    ]


def test_a_failing_task_fails_the_sequence_and_frees_the_sequencer() -> None:
    async def scenario() -> tuple[Recorder, Node, str | None]:
        node = Node()
        recorder = Recorder()
        sequencer = Sequencer(node, recorder)
        seq = sequence("boot").then("ok", step("a")).then("bad", boom).then("never", step("z"))
        with pytest.raises(ValueError, match="disk on fire"):
            await sequencer.start(seq)
        running = sequencer.running
        await sequencer.start(sequence("reboot").then("again", step("b")))
        return recorder, node, running

    recorder, node, running = run(scenario())
    assert running is None
    assert recorder.of("boot") == [
        ("", "started"),
        ("ok", "phase started"),
        ("bad", "phase started"),
        ("", "failed: ValueError: disk on fire"),
    ]
    assert "z start" not in node.log
    assert node.log[-2:] == ["b start", "b end"]
    assert recorder.of("reboot")[-1] == ("", "finished")


def test_a_failing_task_stops_its_siblings() -> None:
    """A failed sequence is over: none of its tasks keeps running after the sequencer is free."""

    async def scenario() -> tuple[bool, bool]:
        node = Node()
        sibling_cancelled = asyncio.Event()

        async def slow(node: Node, request: Any) -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                sibling_cancelled.set()
                raise

        async def fail_soon(node: Node, request: Any) -> None:
            await asyncio.sleep(0)
            raise ValueError("nope")

        sequencer = Sequencer(node, Recorder())
        with pytest.raises(ValueError):
            await sequencer.start(sequence("boot").then("both", slow, fail_soon))
        return sibling_cancelled.is_set(), sequencer.running is None

    assert run(scenario()) == (True, True)


def test_conflict_names_the_running_sequence() -> None:
    async def scenario() -> tuple[SequenceConflictError, str | None, list[str]]:
        node = Node()
        sequencer = Sequencer(node, Recorder())
        task = sequencer.start(blocked("apply-config"))
        await settle()
        with pytest.raises(SequenceConflictError) as caught:
            sequencer.start(blocked("reboot"))
        running = sequencer.running
        node.gate.set()
        await task
        return caught.value, running, node.log

    error, running, log = run(scenario())
    assert error.running == "apply-config"
    assert error.requested == "reboot"
    assert "'apply-config' is running" in str(error)
    assert error.hint
    assert running == "apply-config"
    assert log[-1] == "apply-config-done end"


def test_the_same_sequence_twice_conflicts() -> None:
    async def scenario() -> SequenceConflictError:
        node = Node()
        sequencer = Sequencer(node, Recorder())
        task = sequencer.start(blocked("boot"))
        await settle()
        with pytest.raises(SequenceConflictError) as caught:
            sequencer.start(blocked("boot"))
        node.gate.set()
        await task
        return caught.value

    assert run(scenario()).running == "boot"


def test_takeover_table() -> None:
    expected = {
        "boot": {"reboot", "shutdown", "reset"},
        "apply-config": set(),
        "upgrade": set(),
        "rollback": set(),
        "reboot": {"shutdown"},
        "shutdown": set(),
        "reset": set(),
    }
    assert {name: set(takers) for name, takers in TAKEOVER.items()} == expected


TAKES_OVER = {("boot", "reboot"), ("boot", "shutdown"), ("boot", "reset"), ("reboot", "shutdown")}


@pytest.mark.parametrize(("running", "requested"), list(itertools.product(NAMES, NAMES)))
def test_takeover(running: str, requested: str) -> None:
    async def scenario() -> tuple[bool, bool, Recorder, str | None]:
        first = Node()
        recorder = Recorder()
        sequencer = Sequencer(first, recorder)
        old = sequencer.start(blocked(running))
        await settle()
        try:
            new = sequencer.start(sequence(requested).then("go", step("new")))
        except SequenceConflictError as exc:
            assert exc.running == running
            assert exc.requested == requested
            assert sequencer.running == running
            first.gate.set()
            await old
            return False, old.cancelled(), recorder, sequencer.running
        await new
        return True, old.cancelled(), recorder, sequencer.running

    took_over, old_cancelled, recorder, after = run(scenario())
    assert took_over == ((running, requested) in TAKES_OVER)
    assert old_cancelled == took_over
    assert after is None
    if took_over:
        assert recorder.events == [
            (running, "", "started"),
            (running, "wait", "phase started"),
            (running, "", f"taken over by {requested}"),
            (running, "", "cancelled"),
            (requested, "", "started"),
            (requested, "go", "phase started"),
            (requested, "", "finished"),
        ]
    else:
        assert recorder.of(running)[-1] == ("", "finished")
        assert recorder.of(requested) == [] or running == requested


def test_takeover_waits_for_the_cancelled_sequence_to_unwind() -> None:
    """The new sequence starts only after the old one's cleanup ran (one at a time)."""

    async def scenario() -> list[str]:
        node = Node()

        async def serve(node: Node, request: Any) -> None:
            try:
                await node.gate.wait()
            finally:
                await asyncio.sleep(0.01)  # e.g. stopping the maintenance API server
                node.log.append("boot cleaned up")

        sequencer = Sequencer(node, Recorder())
        sequencer.start(sequence("boot").then("maintenance", serve))
        await settle()
        await sequencer.start(sequence("shutdown").then("stop", step("stop")))
        return node.log

    assert run(scenario()) == ["boot cleaned up", "stop start", "stop end"]


def test_shutdown_takes_over_a_reboot_that_took_over_boot() -> None:
    async def scenario() -> tuple[Recorder, list[bool]]:
        node = Node()
        recorder = Recorder()
        sequencer = Sequencer(node, recorder)
        boot = sequencer.start(blocked("boot"))
        await settle()
        reboot = sequencer.start(blocked("reboot"))
        await settle()
        shutdown = sequencer.start(sequence("shutdown").then("off", step("off")))
        await shutdown
        await asyncio.gather(boot, reboot, return_exceptions=True)
        return recorder, [boot.cancelled(), reboot.cancelled(), shutdown.cancelled()]

    recorder, cancelled = run(scenario())
    assert cancelled == [True, True, False]
    last_cancelled = max(
        i for i, (seq, _, message) in enumerate(recorder.events) if message == "cancelled"
    )
    assert recorder.events.index(("shutdown", "", "started")) > last_cancelled
    assert recorder.of("boot")[-1] == ("", "cancelled")
    assert recorder.of("reboot")[-1] == ("", "cancelled")
    assert recorder.of("shutdown")[-1] == ("", "finished")


def test_a_refusal_is_one_log_line_and_a_bug_is_a_trace(caplog: pytest.LogCaptureFixture) -> None:
    """An expected refusal (a BasaltError with a hint) is logged as one line with the
    reason; only a bug gets a traceback. Nobody awaiting a sequence leaves no trace either."""
    import gc
    import logging

    from basalt.machinery.errors import BasaltError

    async def refuse(node: Node, request: Any) -> None:
        raise BasaltError("rollback refused: slot a (9.9.2) failed", hint="upgrade instead")

    async def scenario() -> None:
        sequencer = Sequencer(Node(), Recorder())
        with pytest.raises(BasaltError):
            await sequencer.start(sequence("rollback").then("check", refuse))
        sequencer.start(sequence("reboot").then("check", refuse))  # fire and forget
        await settle()
        await asyncio.sleep(0.05)
        with pytest.raises(ValueError):
            await sequencer.start(sequence("upgrade").then("bad", boom))

    with caplog.at_level(logging.DEBUG):
        run(scenario())
        gc.collect()
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert [r.getMessage() for r in refusals] == [
        "sequence rollback refused: rollback refused: slot a (9.9.2) failed hint: upgrade instead",
        "sequence reboot refused: rollback refused: slot a (9.9.2) failed hint: upgrade instead",
    ]
    assert all(r.exc_info is None and r.levelno == logging.WARNING for r in refusals)
    assert "never retrieved" not in caplog.text
    bugs = [r for r in caplog.records if r.exc_info is not None]
    assert len(bugs) == 1 and "sequence upgrade failed" in bugs[0].getMessage()


def test_sequences_are_started_by_the_name_they_are_registered_under() -> None:
    async def body() -> None:
        node = Node()
        sequencer = Sequencer(node, Recorder())
        sequencer.register({"reboot": sequence("reboot").then("go", step("r"))})
        await sequencer.start("reboot")
        assert node.log == ["r start", "r end"]
        with pytest.raises(KeyError, match="shutdown"):
            sequencer.start("shutdown")
        with pytest.raises(ValueError, match="registered as"):
            sequencer.register({"reset": sequence("reboot")})

    run(body())


def test_the_node_registers_every_sequence_by_its_own_name() -> None:
    from basalt.machined.runtime.sequencer import SEQUENCE_NAMES
    from basalt.machined.sequencer.sequences import SEQUENCES

    assert set(SEQUENCES) == set(SEQUENCE_NAMES) == set(TAKEOVER)
    for name, seq in SEQUENCES.items():
        assert seq.name == name
