"""machined's end is bounded: a thread blocked in a read or a task that will not cancel
must not keep PID 1 from rebooting (asyncio.run would wait for them forever)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from basalt.machined.main import run_bounded


def test_the_agent_ends_although_a_thread_and_a_task_hang(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    tasks: list[asyncio.Task[None]] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # will not end

    async def agent() -> int:
        asyncio.get_running_loop().run_in_executor(None, release.wait)  # blocks its thread
        tasks.append(asyncio.create_task(stubborn(), name="stubborn-task"))
        await asyncio.sleep(0.05)
        return 75

    started = time.monotonic()
    try:
        assert run_bounded(agent(), grace=0.5) == 75
        assert time.monotonic() - started < 5
        # the warning says which task, and where it waits (for the next such report)
        warning = next(r.getMessage() for r in caplog.records if "did not end" in r.getMessage())
        assert "stubborn-task: test_the_agent_ends" in warning and "test_teardown.py:" in warning
    finally:
        release.set()


def test_tasks_that_end_when_cancelled_are_given_the_time() -> None:
    ended: list[str] = []
    tasks: list[asyncio.Task[None]] = []

    async def polite() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)
            ended.append("polite")
            raise

    async def agent() -> int:
        tasks.append(asyncio.create_task(polite()))
        await asyncio.sleep(0.01)
        return 0

    assert run_bounded(agent(), grace=5) == 0
    assert ended == ["polite"]


def test_pid1_start_up_garbage_collection_comes_back_on_when_the_api_opens() -> None:
    """PID 1 imports with the cyclic collector off (main); the "API listening" line turns
    it back on for what comes after (what start-up built is frozen), and logs machined's
    memory then, once; end_startup() hands the frozen heap back to the collector."""
    import gc
    import logging

    from basalt.machined.main import _ApiOpenedNote, end_startup

    note = _ApiOpenedNote()
    was = gc.isenabled()
    gc.disable()
    try:
        other = logging.LogRecord("x", logging.INFO, __file__, 1, "boot: started", None, None)
        assert note.filter(other) and not gc.isenabled()
        opened = logging.LogRecord("x", logging.INFO, __file__, 1, "API listening on %s", (), None)
        assert note.filter(opened) and gc.isenabled() and note.done
        assert gc.get_freeze_count() > 0
        gc.disable()
        assert note.filter(opened) and not gc.isenabled()  # once only
        end_startup()
        assert gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        if was:
            gc.enable()
        else:
            gc.disable()
