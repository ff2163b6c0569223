"""The node's event bus: a bounded history of what happened, and live followers.

Everything that changes on the node (a service state, a sequence phase, a config apply)
publishes an :class:`Event`. ``basaltctl events`` reads :meth:`EventBus.history` and
:meth:`EventBus.follow`.

Publishing never waits for readers. Each follower has its own bounded queue; a follower
that falls behind loses events, and in their place receives one synthetic ``overflow``
event that says how many were dropped and which ids they had, then carries on.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["OVERFLOW", "Dropped", "Event", "EventBus", "FollowQueue"]

OVERFLOW = "overflow"
"""The type of the synthetic event a follower receives in place of events it lost."""

_ID_WIDTH = 10

T = TypeVar("T")


@dataclass(frozen=True)
class Event:
    """One thing that happened on the node.

    ``id`` is a zero-padded sequence number (``"0000000042"``): ids of one bus are unique,
    increase with every event, and sort as strings.
    """

    id: str
    type: str
    timestamp: float
    actor: str
    message: str
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Dropped(Generic[T]):
    """What a :class:`FollowQueue` hands out in place of items it had to drop."""

    count: int
    first: T
    last: T


class _Gap(Generic[T]):
    """A run of dropped items, kept in the queue where they would have been."""

    __slots__ = ("count", "first", "last")

    def __init__(self, item: T) -> None:
        self.count = 1
        self.first = item
        self.last = item

    def add(self, item: T) -> None:
        self.count += 1
        self.last = item


class FollowQueue(Generic[T]):
    """A bounded queue from one publisher to one follower; :meth:`put` never blocks.

    When ``maxsize`` items are waiting, further items are dropped and counted. The
    follower gets them back as one :class:`Dropped` at the place where they were lost,
    so what it sees stays in order. Used by the event bus and by service log buffers.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"follower queue size must be at least 1, got {maxsize}")
        self._maxsize = maxsize
        self._items: deque[T | _Gap[T]] = deque()
        self._size = 0
        self._closed = False
        self._wakeup = asyncio.Event()

    def __len__(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> bool:
        """Queue ``item``; return False when it was dropped (queue full or closed)."""
        if self._closed:
            return False
        self._wakeup.set()
        if self._size >= self._maxsize:
            tail = self._items[-1] if self._items else None
            if isinstance(tail, _Gap):
                tail.add(item)
            else:
                self._items.append(_Gap(item))
            return False
        self._items.append(item)
        self._size += 1
        return True

    def close(self) -> None:
        """End the follower once it has taken what is already queued."""
        self._closed = True
        self._wakeup.set()

    async def get(self) -> T | Dropped[T] | None:
        """The next item, a :class:`Dropped` for a lost run, or None once closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        item = self._items.popleft()
        if isinstance(item, _Gap):
            return Dropped(item.count, item.first, item.last)
        self._size -= 1
        return item


class EventBus:
    """The node's event bus: a ring of the last ``capacity`` events, plus followers.

    All methods are meant to be called from the event loop's thread. :meth:`publish` is
    synchronous and constant-time, so any code on the loop may call it.
    """

    def __init__(
        self,
        capacity: int = 2048,
        *,
        follower_queue: int = 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"event bus capacity must be at least 1, got {capacity}")
        self._events: deque[Event] = deque(maxlen=capacity)
        self._follower_queue = follower_queue
        self._followers: set[FollowQueue[Event]] = set()
        self._clock = clock
        self._seq = 0

    @property
    def follower_count(self) -> int:
        """How many followers are attached right now."""
        return len(self._followers)

    def publish(self, type: str, message: str, *, actor: str = "", **fields: str) -> Event:
        """Record an event and hand it to every follower; never blocks."""
        self._seq += 1
        event = Event(
            id=f"{self._seq:0{_ID_WIDTH}d}",
            type=type,
            timestamp=self._clock(),
            actor=actor,
            message=message,
            fields={key: str(value) for key, value in fields.items()},
        )
        self._events.append(event)
        for queue in self._followers:
            queue.put(event)
        return event

    def history(
        self,
        since_id: str | None = None,
        since_seconds: float | None = None,
        tail: int | None = None,
    ) -> list[Event]:
        """Retained events, oldest first, filtered.

        ``since_id`` keeps events after that id (exclusive); ``since_seconds`` keeps those
        at most that many seconds old; ``tail`` then keeps only the last N. Without
        filters, every retained event. Events older than the ring's capacity are gone.
        """
        events: list[Event] = list(self._events)
        if since_id is not None:
            after = _parse_id(since_id)
            events = [e for e in events if int(e.id) > after]
        if since_seconds is not None:
            cutoff = self._clock() - since_seconds
            events = [e for e in events if e.timestamp >= cutoff]
        if tail is not None:
            if tail < 0:
                raise ValueError(f"tail must not be negative, got {tail}")
            events = events[len(events) - tail :] if tail else []
        return events

    async def follow(
        self,
        since_id: str | None = None,
        since_seconds: float | None = None,
        tail: int | None = None,
        *,
        queue_size: int | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Yield the matching :meth:`history`, then every new event as it is published.

        Ends only when the consumer stops: ``aclose()``, cancellation, or dropping the
        iterator all detach the follower. A consumer slower than the publisher receives
        an event of type ``overflow`` in place of the events it lost; its fields say how
        many (``dropped``) and which (``first_id``, ``last_id``), and its id is
        ``last_id`` so that resuming after it with ``since_id`` continues in order.
        """
        queue: FollowQueue[Event] = FollowQueue(queue_size or self._follower_queue)
        # No await between the snapshot and attaching: nothing can slip between them.
        backlog = self.history(since_id, since_seconds, tail)
        self._followers.add(queue)
        try:
            for event in backlog:
                yield event
            while True:
                item = await queue.get()
                if item is None:  # pragma: no cover - the bus never closes its queues
                    return
                yield _overflow_event(item) if isinstance(item, Dropped) else item
        finally:
            self._followers.discard(queue)


def _parse_id(event_id: str) -> int:
    try:
        return int(event_id)
    except ValueError:
        raise ValueError(
            f"not an event id: {event_id!r} (expected digits, e.g. '0000000042')"
        ) from None


def _overflow_event(dropped: Dropped[Event]) -> Event:
    return Event(
        id=dropped.last.id,
        type=OVERFLOW,
        timestamp=dropped.last.timestamp,
        actor="",
        message=(
            f"follower fell behind: {dropped.count} events dropped "
            f"({dropped.first.id}..{dropped.last.id})"
        ),
        fields={
            "dropped": str(dropped.count),
            "first_id": dropped.first.id,
            "last_id": dropped.last.id,
        },
    )
