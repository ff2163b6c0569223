"""Per-service logs: a bounded ring of lines that readers can tail and follow."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncGenerator

from basalt.machined.events import Dropped, FollowQueue

__all__ = ["LineSplitter", "LogBuffer"]


class LogBuffer:
    """The last ``max_lines`` lines a service wrote, each cut to ``max_line_bytes``.

    Lines are bytes without their trailing newline. Appending never blocks: a follower
    that falls behind gets one marker line saying how many lines it missed. One buffer
    lives as long as its service is registered, across restarts.
    """

    def __init__(
        self, max_lines: int = 2000, max_line_bytes: int = 8192, *, follower_queue: int = 1024
    ) -> None:
        if max_lines < 1 or max_line_bytes < 1:
            raise ValueError("a log buffer needs max_lines >= 1 and max_line_bytes >= 1")
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self._lines: deque[bytes] = deque(maxlen=max_lines)
        self._follower_queue = follower_queue
        self._followers: set[FollowQueue[bytes]] = set()
        self._total = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def total(self) -> int:
        """How many lines were ever appended, including those the ring has let go."""
        return self._total

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def follower_count(self) -> int:
        return len(self._followers)

    def append(self, line: bytes) -> None:
        """Add one line; a trailing newline is removed and the rest cut to the limit."""
        if line.endswith(b"\n"):
            line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
        line = line[: self.max_line_bytes]
        self._lines.append(line)
        self._total += 1
        for queue in self._followers:
            queue.put(line)

    def lines(self, tail: int | None = None) -> list[bytes]:
        """The retained lines, oldest first; only the last ``tail`` when given."""
        lines = list(self._lines)
        if tail is None:
            return lines
        if tail < 0:
            raise ValueError(f"tail must not be negative, got {tail}")
        return lines[len(lines) - tail :] if tail else []

    async def follow(self, tail: int | None = None) -> AsyncGenerator[bytes, None]:
        """Yield :meth:`lines` (``tail``), then new lines as they come, until :meth:`close`.

        A follower that falls behind gets ``[N lines dropped: reader too slow]`` in place
        of the lines it lost. Stopping the iteration (``aclose()``, cancellation) detaches
        the follower.
        """
        backlog = self.lines(tail)
        if self._closed:
            for line in backlog:
                yield line
            return
        queue: FollowQueue[bytes] = FollowQueue(self._follower_queue)
        self._followers.add(queue)
        try:
            for line in backlog:
                yield line
            while (item := await queue.get()) is not None:
                yield _dropped_line(item) if isinstance(item, Dropped) else item
        finally:
            self._followers.discard(queue)

    def close(self) -> None:
        """End every follower (after the lines already queued for it); lines stay readable."""
        self._closed = True
        for queue in self._followers:
            queue.close()


def _dropped_line(dropped: Dropped[bytes]) -> bytes:
    return f"[{dropped.count} lines dropped: reader too slow]".encode()


class LineSplitter:
    """Turns a byte stream into lines for a :class:`LogBuffer`.

    A line longer than the buffer's ``max_line_bytes`` is flushed in pieces, so memory
    stays bounded whatever a process writes.
    """

    def __init__(self, log: LogBuffer) -> None:
        self._log = log
        self._pending = bytearray()

    def feed(self, data: bytes) -> None:
        self._pending += data
        limit = self._log.max_line_bytes
        while True:
            newline = self._pending.find(b"\n")
            if newline < 0 or newline > limit:
                if len(self._pending) < limit:
                    return
                self._log.append(bytes(self._pending[:limit]))
                del self._pending[:limit]
                continue
            self._log.append(bytes(self._pending[: newline + 1]))
            del self._pending[: newline + 1]

    def flush(self) -> None:
        """Append what is left of an unterminated last line."""
        if self._pending:
            self._log.append(bytes(self._pending))
            self._pending.clear()
