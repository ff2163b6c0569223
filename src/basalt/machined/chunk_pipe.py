"""Chunks handed from the event loop to a worker thread that reads them like a file.

An upload arrives as chunks on the event loop; verifying it (hashing, parsing the tar)
is blocking work for a thread. :class:`ChunkPipe` joins the two: the loop ``put``\\ s each
chunk and the thread ``read``\\ s bytes, so the thread hashes one chunk while the loop
receives the next. The queue is short: a slow reader slows the sender instead of
piling the upload up in memory.
"""

from __future__ import annotations

import asyncio
import queue


class PipeAborted(Exception):
    """The sending side gave up (the upload failed or was cancelled)."""


_EOF = None


class ChunkPipe:
    """One loop-side sender, one thread-side reader."""

    def __init__(self, depth: int = 8) -> None:
        self._queue: queue.Queue[bytes | PipeAborted | None] = queue.Queue(depth)
        self._loop = asyncio.get_running_loop()
        self._taken = asyncio.Event()
        self._rest = memoryview(b"")
        #: The chunk ``_rest`` views while none of it has been read: handed on uncopied.
        self._whole: bytes | None = None
        self._eof = False
        #: Set by the reader when it stops reading, for good or because it failed.
        self.stopped = False

    # -- the event loop's side ------------------------------------------------------------
    async def put(self, chunk: bytes) -> bool:
        """Hand ``chunk`` over, waiting while the queue is full; False when the reader
        has stopped (its result says why) and the chunk was not taken."""
        return await self._put(chunk)

    async def close(self) -> bool:
        """No more chunks: the reader sees the end of the file."""
        return await self._put(_EOF)

    async def abort(self, why: str) -> None:
        """The reader's next read raises :class:`PipeAborted`."""
        await self._put(PipeAborted(why))

    async def _put(self, item: bytes | PipeAborted | None) -> bool:
        while not self.stopped:
            try:
                self._queue.put_nowait(item)
                return True
            except queue.Full:
                # The reader's take schedules set() on the loop, so it runs after this
                # clear() whichever thread got there first.
                self._taken.clear()
                await self._taken.wait()
        return False

    # -- the reading thread's side --------------------------------------------------------
    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all of the next chunk when ``size`` < 0); b"" at the end."""
        while not self._rest:
            if self._eof:
                return b""
            item = self._queue.get()
            self._loop.call_soon_threadsafe(self._taken.set)
            if item is _EOF:
                self._eof = True
                return b""
            if isinstance(item, PipeAborted):
                self._eof = True
                raise item
            self._rest = memoryview(item)
            self._whole = item
        count = len(self._rest) if size < 0 else min(size, len(self._rest))
        if self._whole is not None and count == len(self._whole):
            data = self._whole
        else:
            data = bytes(self._rest[:count])
        self._whole = None
        self._rest = self._rest[count:]
        return data

    def stop(self) -> None:
        """The reader is done with the pipe (call it from the thread, in a ``finally``)."""
        self.stopped = True
        self._loop.call_soon_threadsafe(self._taken.set)
