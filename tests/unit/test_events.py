"""The event bus: ids, history filters, followers, overflow and follower cleanup."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from basalt.machined.events import OVERFLOW, Event, EventBus, FollowQueue

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 5))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ids_increase_and_sort_as_strings() -> None:
    bus = EventBus()
    events = [bus.publish("config", f"e{i}", actor="apply") for i in range(12)]
    ids = [e.id for e in events]
    assert ids[0] == "0000000001"
    assert ids == sorted(ids)
    assert len(set(ids)) == 12
    assert events[3].fields == {}
    assert events[3].actor == "apply"


def test_publish_records_fields_type_and_time() -> None:
    clock = Clock()
    bus = EventBus(clock=clock)
    event = bus.publish("service", "running", actor="etcd", state="running", pid="42")
    assert event == Event(
        id="0000000001",
        type="service",
        timestamp=1000.0,
        actor="etcd",
        message="running",
        fields={"state": "running", "pid": "42"},
    )


def test_history_is_bounded_by_capacity() -> None:
    bus = EventBus(capacity=5)
    for i in range(12):
        bus.publish("machine", f"e{i}")
    assert [e.message for e in bus.history()] == [f"e{i}" for i in range(7, 12)]


def test_history_filters() -> None:
    clock = Clock()
    bus = EventBus(clock=clock)
    for i in range(10):
        clock.now = 1000.0 + i
        bus.publish("sequence", f"e{i}")
    assert [e.message for e in bus.history(since_id="0000000007")] == ["e7", "e8", "e9"]
    assert [e.message for e in bus.history(since_seconds=2)] == ["e7", "e8", "e9"]
    assert [e.message for e in bus.history(tail=2)] == ["e8", "e9"]
    assert bus.history(tail=0) == []
    assert [e.message for e in bus.history(since_id="0000000002", tail=1)] == ["e9"]
    assert bus.history(since_id="0000000010") == []
    with pytest.raises(ValueError, match="not an event id"):
        bus.history(since_id="latest")
    with pytest.raises(ValueError, match="tail"):
        bus.history(tail=-1)


def test_follow_yields_history_then_live_events() -> None:
    async def scenario() -> list[str]:
        bus = EventBus()
        bus.publish("config", "old-1")
        bus.publish("config", "old-2")
        seen: list[str] = []
        follower = bus.follow(tail=1)
        seen.append((await anext(follower)).message)
        bus.publish("config", "new-1")
        bus.publish("service", "new-2")
        seen.append((await anext(follower)).message)
        seen.append((await anext(follower)).message)
        await follower.aclose()
        return seen

    assert run(scenario()) == ["old-2", "new-1", "new-2"]


def test_follow_waits_for_new_events_without_polling() -> None:
    async def scenario() -> Event:
        bus = EventBus()
        follower = bus.follow()
        waiting = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        bus.publish("machine", "hello")
        event = await waiting
        await follower.aclose()
        return event

    assert run(scenario()).message == "hello"


def test_slow_follower_gets_one_overflow_event_and_continues() -> None:
    async def scenario() -> tuple[list[Event], int]:
        bus = EventBus()
        follower = bus.follow(queue_size=4)
        bus.publish("service", "e0")
        received = [await anext(follower)]  # e0, from history; now attached
        published = [bus.publish("service", f"e{i}") for i in range(1, 21)]  # no await: 4 fit
        received += [await anext(follower) for _ in range(5)]
        bus.publish("service", "after")
        received.append(await anext(follower))
        await follower.aclose()
        return received, int(published[-1].id)

    received, last_id = run(scenario())
    assert [e.message for e in received[:5]] == ["e0", "e1", "e2", "e3", "e4"]
    overflow = received[5]
    assert overflow.type == OVERFLOW
    assert overflow.fields == {
        "dropped": "16",
        "first_id": f"{last_id - 15:010d}",
        "last_id": f"{last_id:010d}",
    }
    assert "16 events dropped" in overflow.message
    assert overflow.id == overflow.fields["last_id"]
    assert received[6].message == "after"


def test_publisher_never_waits_for_followers() -> None:
    async def scenario() -> int:
        bus = EventBus(capacity=10)
        followers = [bus.follow(queue_size=2) for _ in range(3)]
        for follower in followers:
            bus.publish("machine", "start")
            await anext(follower)
        for i in range(10_000):  # nobody reads; publishing must not block or grow queues
            bus.publish("machine", f"e{i}")
        for follower in followers:
            await follower.aclose()
        return len(bus.history())

    assert run(scenario()) == 10


def test_follower_detaches_on_aclose() -> None:
    async def scenario() -> list[int]:
        bus = EventBus()
        follower = bus.follow()
        bus.publish("machine", "x")
        await anext(follower)
        counts = [bus.follower_count]
        await follower.aclose()
        counts.append(bus.follower_count)
        return counts

    assert run(scenario()) == [1, 0]


def test_follower_detaches_on_cancellation() -> None:
    async def scenario() -> list[int]:
        bus = EventBus()
        got: list[str] = []

        async def consume() -> None:
            async for event in bus.follow():
                got.append(event.message)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        bus.publish("machine", "one")
        await asyncio.sleep(0.01)
        counts = [bus.follower_count]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        counts.append(bus.follower_count)
        assert got == ["one"]
        return counts

    assert run(scenario()) == [1, 0]


def test_follower_detaches_when_consumer_breaks_out() -> None:
    async def scenario() -> int:
        bus = EventBus()
        bus.publish("machine", "x")
        async for _ in bus.follow():
            break
        # The dropped generator is closed by the loop's async-generator finalizer.
        for _ in range(3):
            await asyncio.sleep(0)
        return bus.follower_count

    assert run(scenario()) == 0


def test_follow_queue_keeps_order_around_a_gap() -> None:
    async def scenario() -> list[object]:
        queue: FollowQueue[int] = FollowQueue(2)
        for i in range(5):
            queue.put(i)
        out: list[object] = [await queue.get()]  # frees a slot: 5 lands after the gap
        queue.put(5)
        queue.close()
        while (item := await queue.get()) is not None:
            out.append(item)
        return out

    out = run(scenario())
    assert out[:2] == [0, 1]
    assert getattr(out[2], "count", None) == 3
    assert (getattr(out[2], "first", None), getattr(out[2], "last", None)) == (2, 4)
    assert out[3:] == [5]
