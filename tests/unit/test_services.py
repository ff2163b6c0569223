"""The service supervisor, with real child processes (no mocks of subprocess)."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import psutil
import pytest

from basalt.machined.events import Event, EventBus
from basalt.machined.services import (
    FlagCondition,
    HealthCheck,
    LineSplitter,
    LogBuffer,
    ProcessRunner,
    RestartPolicy,
    ServiceSpec,
    ServiceState,
    ServiceStatus,
    Supervisor,
    TaskRunner,
    UnknownServiceError,
)
from basalt.machinery.errors import BasaltError

T = TypeVar("T")

SLEEP = "import time; time.sleep(60)"


def py(code: str, *, stop_timeout: float = 2.0) -> ProcessRunner:
    return ProcessRunner([sys.executable, "-I", "-S", "-c", code], stop_timeout=stop_timeout)


async def forever(log: LogBuffer) -> None:
    log.append(b"in-process service up")
    await asyncio.Event().wait()


def run(
    body: Callable[[Supervisor, EventBus], Awaitable[T]],
    *,
    on_change: Callable[[ServiceStatus], None] | None = None,
    timeout: float = 10.0,
) -> T:
    """Run ``body`` with a fresh bus and supervisor; stop everything afterwards."""

    async def main() -> T:
        bus = EventBus()
        supervisor = Supervisor(bus, on_change)
        try:
            return await asyncio.wait_for(body(supervisor, bus), timeout)
        finally:
            await supervisor.stop_all()

    return asyncio.run(main())


def sync(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 5))


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def reach(
    supervisor: Supervisor, service_id: str, state: ServiceState, timeout: float = 5.0
) -> ServiceStatus:
    def there() -> bool:
        return supervisor.status(service_id).state == state

    try:
        await until(there, f"{service_id} {state}", timeout)
    except AssertionError:
        status = supervisor.status(service_id)
        raise AssertionError(f"{service_id} never reached {state}: {status}") from None
    return supervisor.status(service_id)


def service_events(bus: EventBus, since_id: str | None = None) -> list[Event]:
    return [e for e in bus.history(since_id=since_id) if e.type == "service"]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- registry ---------------------------------------------------------------------------


def test_register_rejects_duplicates_cycles_and_unknown_ids() -> None:
    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(ServiceSpec("a", py(SLEEP), depends_on=("c",)))
        with pytest.raises(ValueError, match="already registered"):
            supervisor.register(ServiceSpec("a", py(SLEEP)))
        supervisor.register(ServiceSpec("b", py(SLEEP), depends_on=("a",)))
        with pytest.raises(ValueError, match="cycle: c -> b -> a -> c"):
            supervisor.register(ServiceSpec("c", py(SLEEP), depends_on=("b",)))
        with pytest.raises(UnknownServiceError) as caught:
            await supervisor.start("nope")
        assert isinstance(caught.value, BasaltError)
        assert caught.value.hint == "registered services: a, b"
        with pytest.raises(UnknownServiceError):
            supervisor.logs("nope")
        assert [s.id for s in supervisor.statuses()] == ["a", "b"]
        assert supervisor.status("a").state == ServiceState.WAITING
        assert supervisor.status("a").message == "not started"

    run(body)
    with pytest.raises(ValueError, match="itself"):
        ServiceSpec("a", py(SLEEP), depends_on=("a",))


# -- starting: dependencies, conditions, skip, prepare ----------------------------------


def test_dependent_waits_for_dependency_running_and_healthy() -> None:
    listening = False

    async def etcd_health() -> None:
        if not listening:
            raise RuntimeError("not listening yet")

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        nonlocal listening
        supervisor.register(ServiceSpec("kubelet", py(SLEEP), depends_on=("etcd",)))
        health = HealthCheck(etcd_health, interval=0.02, timeout=1.0)
        supervisor.register(ServiceSpec("etcd", py(SLEEP), health_check=health))
        await supervisor.start_all()

        etcd = await reach(supervisor, "etcd", ServiceState.RUNNING)
        assert etcd.pid > 0
        await until(lambda: supervisor.status("etcd").health == "unhealthy", "etcd unhealthy")
        await asyncio.sleep(0.1)
        kubelet = supervisor.status("kubelet")
        assert kubelet.state == ServiceState.WAITING
        assert kubelet.message == "waiting for service etcd (not healthy yet)"

        listening = True
        await reach(supervisor, "kubelet", ServiceState.RUNNING)
        seen = [(e.actor, e.message) for e in service_events(bus)]
        assert seen.index(("etcd", "health check passed")) < seen.index(("kubelet", "starting"))
        assert supervisor.status("etcd").health == "healthy"
        assert supervisor.status("kubelet").health == "unknown"  # no health check

    run(body)


def test_waiting_message_names_services_and_conditions() -> None:
    network = FlagCondition("network ready")

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(ServiceSpec("etcd", TaskRunner(forever)))
        spec = ServiceSpec("apid", TaskRunner(forever), depends_on=("etcd",), conditions=(network,))
        supervisor.register(spec)
        await supervisor.start("apid")

        def message() -> str:
            return supervisor.status("apid").message

        await until(lambda: message() == "waiting for service etcd, condition 'network ready'", "")
        network.set()
        await until(lambda: message() == "waiting for service etcd", "condition to clear")
        await supervisor.start("etcd")
        await reach(supervisor, "apid", ServiceState.RUNNING)
        assert supervisor.status("apid").pid == 0
        assert supervisor.logs("apid").lines() == [b"in-process service up"]

    run(body)


def test_dependency_not_registered_is_named() -> None:
    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(ServiceSpec("kubelet", TaskRunner(forever), depends_on=("cri",)))
        await supervisor.start("kubelet")
        await until(
            lambda: (
                supervisor.status("kubelet").message == "waiting for service cri (not registered)"
            ),
            "waiting message",
        )
        supervisor.register(ServiceSpec("cri", TaskRunner(forever)))
        await supervisor.start("cri")
        await reach(supervisor, "kubelet", ServiceState.RUNNING)

    run(body)


def test_skip_reason_skips_the_service() -> None:
    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(
            ServiceSpec("kubelet", py(SLEEP), skip_reason=lambda: "kubelet binary not in image")
        )
        supervisor.register(ServiceSpec("cni", TaskRunner(forever), depends_on=("kubelet",)))
        await supervisor.start_all()
        status = await reach(supervisor, "kubelet", ServiceState.SKIPPED)
        assert status.message == "kubelet binary not in image"
        assert status.pid == 0
        event = service_events(bus)[0]
        assert (event.actor, event.fields["state"]) == ("kubelet", "skipped")
        await until(
            lambda: supervisor.status("cni").message == "waiting for service kubelet (skipped)",
            "dependent names the skipped service",
        )

    run(body)


def test_prepare_runs_between_waiting_and_starting() -> None:
    prepared: list[str] = []

    async def prepare() -> None:
        prepared.append("done")

    async def broken_prepare() -> None:
        raise RuntimeError("cannot write /var/lib/etcd")

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(ServiceSpec("ok", TaskRunner(forever), prepare=prepare))
        supervisor.register(
            ServiceSpec(
                "bad", TaskRunner(forever), prepare=broken_prepare, restart=RestartPolicy.NEVER
            )
        )
        await supervisor.start_all()
        await reach(supervisor, "ok", ServiceState.RUNNING)
        states = [e.state for e in supervisor.status("ok").events]
        assert states == [ServiceState.PREPARING, ServiceState.STARTING, ServiceState.RUNNING]
        assert prepared == ["done"]
        bad = await reach(supervisor, "bad", ServiceState.FAILED)
        assert bad.message == "prepare failed: RuntimeError: cannot write /var/lib/etcd"

    run(body)


def test_missing_binary_fails_with_reason() -> None:
    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        runner = ProcessRunner(["/nonexistent/bin/kubelet"])
        supervisor.register(ServiceSpec("kubelet", runner, restart=RestartPolicy.NEVER))
        await supervisor.start("kubelet")
        status = await reach(supervisor, "kubelet", ServiceState.FAILED)
        assert status.message.startswith("cannot start: ")
        assert "/nonexistent/bin/kubelet" in status.message

    run(body)


# -- running: health, exit, restart ----------------------------------------------------


def test_health_check_transitions_are_events() -> None:
    mode = "ok"

    async def probe() -> None:
        if mode == "refuse":
            raise ConnectionRefusedError("connection refused")
        if mode == "hang":
            await asyncio.sleep(10)

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        nonlocal mode
        check = HealthCheck(probe, interval=0.02, timeout=0.05, initial_delay=0.02)
        supervisor.register(ServiceSpec("apid", TaskRunner(forever), health_check=check))
        await supervisor.start("apid")
        await reach(supervisor, "apid", ServiceState.RUNNING)
        await until(lambda: supervisor.status("apid").health == "healthy", "healthy")

        mode = "refuse"
        await until(lambda: supervisor.status("apid").health == "unhealthy", "unhealthy")
        assert supervisor.status("apid").health_message == "connection refused"
        mode = "ok"
        await until(lambda: supervisor.status("apid").health == "healthy", "healthy again")
        mode = "hang"
        await until(lambda: supervisor.status("apid").health == "unhealthy", "timeout")
        assert supervisor.status("apid").health_message == "timed out after 0.05s"

        messages = [e.message for e in service_events(bus) if "health" in e.message]
        assert messages == [
            "health check passed",
            "health check failed: connection refused",
            "health check passed",
            "health check failed: timed out after 0.05s",
        ]
        assert supervisor.status("apid").state == ServiceState.RUNNING  # health never kills

    run(body)


def test_a_starting_service_is_checked_sooner_until_its_first_pass() -> None:
    """An interval of 5 s, a service that becomes healthy at its fourth check: it is
    known healthy within two seconds of start (0.25 s, 0.5 s, then 1 s apart, never
    more while it starts), then checked every 5 s."""
    checks: list[float] = []

    async def probe() -> None:
        checks.append(time.monotonic())
        if len(checks) < 4:
            raise ConnectionRefusedError("not listening yet")

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        check = HealthCheck(probe, interval=5.0, timeout=1.0, initial_delay=0.0)
        supervisor.register(ServiceSpec("containerd", TaskRunner(forever), health_check=check))
        started = time.monotonic()
        await supervisor.start("containerd")
        await until(lambda: supervisor.status("containerd").health == "healthy", "healthy")
        assert time.monotonic() - started < 4.0  # not the 15 s of three intervals
        first, second, third = (b - a for a, b in itertools.pairwise(checks))
        assert 0.24 <= first < 0.6 and 0.49 <= second < 1.2, (first, second)
        assert 0.99 <= third < 1.7, third
        await asyncio.sleep(1.5)
        assert len(checks) == 4  # healthy: the next check is the interval away

    run(body)


def test_failure_reports_exit_code_and_last_log_line() -> None:
    code = (
        "import sys\n"
        "print('starting up', flush=True)\n"
        "print('fatal: cannot bind 127.0.0.1:2379', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(ServiceSpec("etcd", py(code), restart=RestartPolicy.NEVER))
        await supervisor.start("etcd")
        status = await reach(supervisor, "etcd", ServiceState.FAILED)
        assert (
            status.message == "exited with code 3; last log line: fatal: cannot bind 127.0.0.1:2379"
        )
        assert status.pid == 0
        assert supervisor.logs("etcd").lines() == [
            b"starting up",
            b"fatal: cannot bind 127.0.0.1:2379",
        ]
        await asyncio.sleep(0.2)  # never: it stays failed
        status = supervisor.status("etcd")
        assert (status.state, status.restarts) == (ServiceState.FAILED, 0)
        starts = [e for e in service_events(bus) if e.fields["state"] == "starting"]
        assert len(starts) == 1

    run(body)


def test_task_exception_is_a_failure_with_traceback_in_log() -> None:
    async def crash(log: LogBuffer) -> None:
        log.append(b"loading config")
        raise RuntimeError("boom")

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(ServiceSpec("trustd", TaskRunner(crash), restart=RestartPolicy.NEVER))
        await supervisor.start("trustd")
        status = await reach(supervisor, "trustd", ServiceState.FAILED)
        assert status.message == "raised RuntimeError: boom"
        lines = supervisor.logs("trustd").lines()
        assert lines[0] == b"loading config"
        assert lines[-1] == b"RuntimeError: boom"

    run(body)


def test_restart_with_exponential_backoff() -> None:
    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        spec = ServiceSpec(
            "flaky",
            py("import sys; print('crash'); sys.exit(1)"),
            restart=RestartPolicy.ON_FAILURE,
            backoff_initial=0.05,
            backoff_max=0.2,
        )
        supervisor.register(spec)
        began = time.monotonic()
        await supervisor.start("flaky")
        await until(lambda: supervisor.status("flaky").restarts >= 4, "4 restarts")
        elapsed = time.monotonic() - began

        events = service_events(bus)
        starts = [e.timestamp for e in events if e.fields["state"] == "starting"]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        for gap, delay in zip(gaps, [0.05, 0.1, 0.2, 0.2], strict=False):
            assert gap >= delay * 0.9, (gaps, delay)
        assert 0.5 <= elapsed < 4.0
        failures = [e.message for e in events if e.fields["state"] == "failed"]
        assert failures[:4] == [
            "exited with code 1; last log line: crash; restarting in 0.05s",
            "exited with code 1; last log line: crash; restarting in 0.1s",
            "exited with code 1; last log line: crash; restarting in 0.2s",
            "exited with code 1; last log line: crash; restarting in 0.2s",
        ]
        assert len(supervisor.status("flaky").events) <= 20

    run(body)


def test_backoff_resets_after_a_stable_run() -> None:
    runs = 0

    async def sometimes_stable(log: LogBuffer) -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            await asyncio.sleep(0.15)  # longer than backoff_reset_after
        raise RuntimeError(f"run {runs} failed")

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        spec = ServiceSpec(
            "svc",
            TaskRunner(sometimes_stable),
            backoff_initial=0.02,
            backoff_max=1.0,
            backoff_reset_after=0.1,
        )
        supervisor.register(spec)
        await supervisor.start("svc")
        await until(lambda: supervisor.status("svc").restarts >= 4, "4 restarts")
        await supervisor.stop("svc")
        failures = [e.message for e in service_events(bus) if e.fields["state"] == "failed"]
        assert failures[:4] == [
            "raised RuntimeError: run 1 failed; restarting in 0.02s",
            "raised RuntimeError: run 2 failed; restarting in 0.04s",
            "raised RuntimeError: run 3 failed; restarting in 0.02s",
            "raised RuntimeError: run 4 failed; restarting in 0.04s",
        ]

    run(body)


def test_on_failure_does_not_restart_a_clean_exit_but_always_does() -> None:
    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        clean = "print('done')"
        supervisor.register(ServiceSpec("once", py(clean), restart=RestartPolicy.ON_FAILURE))
        supervisor.register(
            ServiceSpec("again", py(clean), restart=RestartPolicy.ALWAYS, backoff_initial=0.02)
        )
        await supervisor.start_all()
        status = await reach(supervisor, "once", ServiceState.FINISHED)
        assert status.message == "exited with code 0"
        await until(lambda: supervisor.status("again").restarts >= 2, "clean exits restarted")
        await asyncio.sleep(0.1)
        assert supervisor.status("once").restarts == 0

    run(body)


# -- stopping ----------------------------------------------------------------------------


def test_stopped_service_stays_stopped_until_started() -> None:
    changes: list[tuple[str, ServiceState]] = []

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(ServiceSpec("etcd", py(SLEEP), backoff_initial=0.01))
        await supervisor.start("etcd")
        first = (await reach(supervisor, "etcd", ServiceState.RUNNING)).pid
        await supervisor.stop("etcd")
        status = supervisor.status("etcd")
        assert (status.state, status.pid) == (ServiceState.FINISHED, 0)
        assert status.message == "stopped (killed by signal SIGTERM)"
        assert gone(first)
        await asyncio.sleep(0.1)
        assert supervisor.status("etcd").state == ServiceState.FINISHED
        await supervisor.stop("etcd")  # stopping a stopped service is a no-op

        await supervisor.start("etcd")
        second = (await reach(supervisor, "etcd", ServiceState.RUNNING)).pid
        await supervisor.restart("etcd")
        third = (await reach(supervisor, "etcd", ServiceState.RUNNING)).pid
        assert len({first, second, third}) == 3
        assert supervisor.status("etcd").restarts == 0  # explicit starts are not restarts

    run(body, on_change=lambda s: changes.append((s.id, s.state)))
    states = [state for _, state in changes]
    assert states[:4] == [
        ServiceState.STARTING,
        ServiceState.RUNNING,
        ServiceState.STOPPING,
        ServiceState.FINISHED,
    ]


def test_stop_while_waiting_or_just_started() -> None:
    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(ServiceSpec("kubelet", py(SLEEP), depends_on=("etcd",)))
        supervisor.register(ServiceSpec("etcd", py(SLEEP), skip_reason=lambda: None))
        await supervisor.start("kubelet")
        await until(lambda: supervisor.status("kubelet").message.startswith("waiting for"), "")
        await supervisor.stop("kubelet")
        assert supervisor.status("kubelet").state == ServiceState.FINISHED
        assert supervisor.status("kubelet").message == "stopped"

        await supervisor.start("etcd")
        await supervisor.stop("etcd")  # before its task ran a single step
        assert supervisor.status("etcd").state == ServiceState.FINISHED
        await asyncio.sleep(0.2)
        assert supervisor.status("etcd").state == ServiceState.FINISHED

    run(body)


def test_stop_all_stops_dependents_first() -> None:
    async def body(supervisor: Supervisor, bus: EventBus) -> dict[str, int]:
        supervisor.register(ServiceSpec("containerd", py(SLEEP)))
        supervisor.register(ServiceSpec("kubelet", py(SLEEP), depends_on=("containerd",)))
        supervisor.register(ServiceSpec("etcd", py(SLEEP)))
        supervisor.register(ServiceSpec("apiserver", py(SLEEP), depends_on=("etcd", "kubelet")))
        await supervisor.start_all()
        pids = {}
        for service_id in ("containerd", "kubelet", "etcd", "apiserver"):
            pids[service_id] = (await reach(supervisor, service_id, ServiceState.RUNNING)).pid

        stops: list[tuple[str, str]] = []

        async def record() -> None:
            async for event in bus.follow(tail=0):
                if event.type == "service":
                    stops.append((event.actor, event.fields["state"]))

        recorder = asyncio.create_task(record())
        await asyncio.sleep(0)
        await supervisor.stop_all()
        await asyncio.sleep(0)
        recorder.cancel()

        finished = [actor for actor, state in stops if state == "finished"]
        stopping = [actor for actor, state in stops if state == "stopping"]
        assert finished.index("apiserver") < stopping.index("kubelet")
        assert finished.index("kubelet") < stopping.index("containerd")
        assert finished.index("apiserver") < stopping.index("etcd")
        assert sorted(finished) == ["apiserver", "containerd", "etcd", "kubelet"]
        return pids

    pids = run(body)
    assert all(gone(pid) for pid in pids.values())


def test_process_ignoring_sigterm_is_killed_with_its_group() -> None:
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "sleeper = 'import time; time.sleep(60)'\n"
        "child = subprocess.Popen([sys.executable, '-I', '-S', '-c', sleeper])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(ServiceSpec("stubborn", py(code, stop_timeout=0.3)))
        await supervisor.start("stubborn")
        pid = (await reach(supervisor, "stubborn", ServiceState.RUNNING)).pid
        log = supervisor.logs("stubborn")
        await until(lambda: bool(log.lines()), "the child's pid in the log")
        child = int(log.lines()[-1].split()[1])

        began = time.monotonic()
        await supervisor.stop("stubborn")
        elapsed = time.monotonic() - began
        assert 0.3 <= elapsed < 2.0
        status = supervisor.status("stubborn")
        assert status.state == ServiceState.FINISHED
        assert status.message == "stopped (killed by signal SIGKILL)"
        assert gone(pid)
        await until(lambda: gone(child), "the grandchild to die with its group", timeout=2)

    run(body)


def test_task_that_ignores_cancellation_does_not_hang_stop() -> None:
    async def stubborn(log: LogBuffer) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log.append(b"ignoring the first cancellation")
        await asyncio.sleep(0.5)

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(ServiceSpec("stubborn", TaskRunner(stubborn, stop_timeout=0.1)))
        await supervisor.start("stubborn")
        await reach(supervisor, "stubborn", ServiceState.RUNNING)
        began = time.monotonic()
        await supervisor.stop_all()
        assert time.monotonic() - began < 0.4
        status = supervisor.status("stubborn")
        assert status.state == ServiceState.FINISHED
        assert status.message == "stopped (did not end within 0.1s of cancellation; left running)"

    run(body)


def test_start_during_stop_starts_again_afterwards() -> None:
    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        slow_to_stop = (
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n"
        )
        supervisor.register(ServiceSpec("etcd", py(slow_to_stop, stop_timeout=0.3)))
        await supervisor.start("etcd")
        first = (await reach(supervisor, "etcd", ServiceState.RUNNING)).pid
        await until(lambda: supervisor.logs("etcd").lines() == [b"ready"], "SIGTERM ignored")
        stopping = asyncio.create_task(supervisor.stop("etcd"))
        await until(lambda: supervisor.status("etcd").state == ServiceState.STOPPING, "stopping")
        await supervisor.start("etcd")
        await stopping
        second = (await reach(supervisor, "etcd", ServiceState.RUNNING)).pid
        assert second != first

    run(body)


# -- logs -----------------------------------------------------------------------------


def test_process_output_is_captured_line_by_line() -> None:
    code = (
        "import sys\n"
        "for i in range(1, 6): print(f'line {i}', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "sys.stdout.write('no newline at the end')\n"
    )

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(ServiceSpec("chatty", py(code), restart=RestartPolicy.NEVER))
        await supervisor.start("chatty")
        await reach(supervisor, "chatty", ServiceState.FINISHED)
        log = supervisor.logs("chatty")
        assert log.lines() == [
            b"line 1",
            b"line 2",
            b"line 3",
            b"line 4",
            b"line 5",
            b"to stderr",
            b"no newline at the end",
        ]
        assert log.lines(tail=2) == [b"to stderr", b"no newline at the end"]

    run(body)


def test_follow_process_logs_live() -> None:
    code = (
        "import time\n"
        "print('first', flush=True)\n"
        "time.sleep(0.2)\n"
        "print('second', flush=True)\n"
        "time.sleep(60)\n"
    )

    async def body(supervisor: Supervisor, bus: EventBus) -> None:
        supervisor.register(ServiceSpec("svc", py(code)))
        await supervisor.start("svc")
        log = supervisor.logs("svc")
        await until(lambda: log.lines() == [b"first"], "first line")
        follower = log.follow(tail=1)
        assert await anext(follower) == b"first"
        assert await asyncio.wait_for(anext(follower), 3) == b"second"
        assert log.follower_count == 1
        await follower.aclose()
        assert log.follower_count == 0

    run(body)


def test_log_buffer_is_bounded() -> None:
    log = LogBuffer(max_lines=3, max_line_bytes=5)
    for i in range(10):
        log.append(f"line-{i}\r\n".encode())
    assert log.lines() == [b"line-", b"line-", b"line-"]
    assert (len(log), log.total) == (3, 10)
    log.append(b"ab\n")
    assert log.lines(tail=2) == [b"line-", b"ab"]
    assert log.lines(tail=0) == []
    with pytest.raises(ValueError):
        log.lines(tail=-1)


def test_line_splitter_handles_chunks_and_long_lines() -> None:
    log = LogBuffer(max_line_bytes=5)
    lines = LineSplitter(log)
    for chunk in (b"ab", b"c\nde", b"f\n", b"x" * 12, b"\n", b"tail"):
        lines.feed(chunk)
    lines.flush()
    assert log.lines() == [b"abc", b"def", b"xxxxx", b"xxxxx", b"xx", b"tail"]


def test_log_follower_overflow_and_close() -> None:
    async def scenario() -> list[bytes]:
        log = LogBuffer(follower_queue=2)
        log.append(b"old")
        follower = log.follow()
        seen = [await anext(follower)]
        for i in range(6):  # nobody reads: 2 fit, 4 are dropped
            log.append(f"new {i}".encode())
        seen += [await anext(follower) for _ in range(3)]
        log.append(b"later")
        log.close()
        seen += [line async for line in follower]
        assert log.follower_count == 0
        seen += [line async for line in log.follow(tail=1)]  # closed: history, then end
        return seen

    assert sync(scenario()) == [
        b"old",
        b"new 0",
        b"new 1",
        b"[4 lines dropped: reader too slow]",
        b"later",
        b"later",
    ]


def test_log_follower_detaches_on_cancellation() -> None:
    async def scenario() -> list[int]:
        log = LogBuffer()

        async def consume() -> None:
            async for _ in log.follow():
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        counts = [log.follower_count]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        counts.append(log.follower_count)
        return counts

    assert sync(scenario()) == [1, 0]
