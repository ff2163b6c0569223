"""machined's entry point: parse the platform arguments, boot, run until reboot/shutdown."""

from __future__ import annotations

# What PID 1 imports before its first log line is all this module imports at the top
# (gc, logging, os, sys, time): the rest is imported where used, after that line is out.
import gc
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse
    from collections.abc import Coroutine

    from .platform import Platform

log = logging.getLogger("machined")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import argparse
    import functools
    from pathlib import Path

    formatter: Any = argparse.HelpFormatter
    if os.getpid() == 1:
        # A help formatter with no width asks the terminal for it through shutil, which
        # brings the compression modules along: PID 1 has no terminal and no time.
        formatter = functools.partial(argparse.HelpFormatter, width=78)
    parser = argparse.ArgumentParser(
        prog="machined", description="The Basalt node agent.", formatter_class=formatter
    )
    parser.add_argument(
        "--platform",
        choices=["container", "metal"],
        default="container",
        help="container: a process on a host; metal: this machine is the node (PID 1: "
        "it mounts, manages the network and kernel settings, reboots the machine)",
    )
    parser.add_argument(
        "--node-dir",
        type=Path,
        help="the node's filesystem view (STATE, EPHEMERAL live below it); metal: /",
    )
    parser.add_argument(
        "--address",
        help="the address the node serves on; metal: the first one its network sets up",
    )
    parser.add_argument(
        "--hostname",
        help="the node's name unless config sets one; metal: the kernel argument "
        "basalt.hostname=, else basalt-MAC from the first NIC",
    )
    parser.add_argument(
        "--cert-validity",
        type=float,
        default=24 * 3600,
        help="node certificate lifetime in seconds",
    )
    parser.add_argument("--announce-interval", type=float, default=10.0)
    parser.add_argument("--member-ttl", type=float, default=60.0)
    parser.add_argument(
        "--boot-assessment-timeout",
        type=float,
        default=120.0,
        help="seconds a slot on trial (the first boots after an upgrade) has to pass its "
        "health gates; otherwise the node reboots and, once its tries run out, falls back",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="seconds an upgrade may spend cordoning and draining the node (when its "
        "kubelet runs) before it is refused and the node uncordoned again",
    )
    parser.add_argument(
        "--stats-interval",
        type=_sampling_interval,
        default=30.0,
        help="seconds between two samples of the node's CPU and memory use (the last "
        "hour of them is the resource SystemStats/history)",
    )
    parser.add_argument(
        "--fleet",
        default="",
        help="the fleet to enrol with and link to (https://HOST:PORT/?token=...&ca=sha256:...); "
        "metal: the kernel argument basalt.fleet=",
    )
    args = parser.parse_args(argv)
    if args.platform == "container":
        names = ("node_dir", "address", "hostname")
        missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
        if missing:
            parser.error(f"--platform container needs {', '.join(missing)}")
    return args


def _sampling_interval(text: str) -> float:
    """At least 0.1 s: the ring keeps an hour of samples, and each is published."""
    import argparse

    value = float(text)
    if not value >= 0.1:
        raise argparse.ArgumentTypeError(f"{text} is below 0.1 seconds")
    return value


class _BufferHandler(logging.Handler):
    def __init__(self, buffer: object) -> None:
        super().__init__()
        self.buffer = buffer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.buffer.append(self.format(record).encode())  # type: ignore[attr-defined]
        except Exception:
            self.handleError(record)


def make_platform(args: argparse.Namespace) -> Platform:
    """metal: the machine's root, the address from the network unless given."""
    from pathlib import Path

    from .platform import UNSPECIFIED_ADDRESS, NodePaths, Platform, PlatformMode

    if args.platform == "metal":
        from .platform.metal import MetalPlatform

        return MetalPlatform.create(
            address=args.address or UNSPECIFIED_ADDRESS,
            hostname=args.hostname or "",
            root=(args.node_dir or Path("/")).resolve(),
        )
    return Platform(
        mode=PlatformMode(args.platform),
        paths=NodePaths.under(args.node_dir.resolve()),
        address=args.address,
        hostname=args.hostname,
    )


def agent(argv: list[str] | None = None) -> int:
    """Parse the arguments, make the platform and let it begin its early work (metal
    PID 1: a child loads the kernel modules while the rest is imported), run the agent."""
    args = parse_args(argv)
    platform = make_platform(args)
    platform.begin()
    return run_bounded(run(args, platform))


async def run(args: argparse.Namespace, platform: Platform) -> int:
    import asyncio
    import datetime as dt
    import signal

    from basalt.machinery.launch import EXIT_FATAL

    from .assemble import build_node
    from .node import Tuning
    from .platform import PowerAction
    from .runtime import SequenceConflictError

    platform.start()
    tuning = Tuning(
        cert_validity=dt.timedelta(seconds=args.cert_validity),
        announce_interval=args.announce_interval,
        member_ttl=args.member_ttl,
        boot_assessment_timeout=args.boot_assessment_timeout,
        drain_timeout=args.drain_timeout,
        stats_interval=args.stats_interval,
        fleet_url=args.fleet,
    )
    node = build_node(platform, tuning)
    from .api import certificate_helper

    certificate_helper.name(node.address)  # PID 1's helper signs on its CPU meanwhile
    handler = _BufferHandler(node.agent_log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)

    def on_signal(signum: int, action: PowerAction) -> None:
        log.info("signal %s: %s", signal.Signals(signum).name, action)
        try:
            node.sequencer.start(action)
        except SequenceConflictError:
            node.finish(action)

    loop = asyncio.get_running_loop()
    if not gc.isenabled():  # PID 1's start-up (see main)
        loop.call_later(STARTUP_GC_LIMIT, end_startup)
    for signum, action in platform.power_signals().items():
        loop.add_signal_handler(signum, on_signal, signum, action)

    boot_task = node.sequencer.start("boot")

    def boot_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("boot failed: %s", task.exception())
            if not node.exit_code.done():
                node.exit_code.set_result(EXIT_FATAL)

    boot_task.add_done_callback(boot_done)
    code = await node.exit_code
    await node.supervisor.stop_all()
    await node.stop_background()
    if node.engine is not None:
        await node.engine.stop()
    log.info("machined exits with %d", code)
    return code


class _UptimeFormatter(logging.Formatter):
    """Log lines stamped like the kernel's (seconds since boot): on a machine's console
    they interleave with kernel messages, and boot timings read off directly."""

    def format(self, record: logging.LogRecord) -> str:
        record.uptime = time.clock_gettime(time.CLOCK_BOOTTIME)
        return super().format(record)


class _ApiOpenedNote(logging.Filter):
    """Once, when the API first listens, logs machined's memory then (from
    /proc/self/status). With the uptime stamps of the initramfs' "switching root" line
    and of "API listening", it gives bench/boot its start-up and RSS figures."""

    def __init__(self, profile: Any = None) -> None:
        super().__init__()
        self.done = False
        #: A running cProfile.Profile (``basalt.profile=1``): printed when the API opens.
        self.profile = profile

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.done and str(record.msg).startswith("API listening"):
            self.done = True
            if self.profile is not None:
                self.profile.disable()
                print_profile(self.profile)
            bundle = sys.modules.get("basalt.machined.startup_bundle")
            bundled = bundle.served() if bundle is not None else 0
            generated = bundle.served_generated() if bundle is not None else 0
            # What start-up built stays (modules, classes, the node): the collector
            # leaves it alone until end_startup(), so the first calls do not wait for
            # passes over the whole heap.
            gc.freeze()
            gc.enable()
            try:
                with open("/proc/self/status") as stream:
                    status = stream.read()
                kib = dict(line.partition(":")[::2] for line in status.splitlines())
                sizes = [int(kib[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")]
            except (OSError, KeyError, ValueError):
                sizes = [0.0, 0.0]
            log.info(
                "API open: machined RSS %.1f MiB (peak %.1f MiB); %d modules and %d "
                "generated functions from the start-up bundle",
                *sizes,
                bundled,
                generated,
            )
        return True


#: Rows of each table ``basalt.profile=1`` prints.
PROFILE_ROWS = 70


def startup_profile(cmdline: str = "/proc/cmdline") -> Any:
    """A started cProfile.Profile when the kernel command line says ``basalt.profile=1``:
    PID 1's start-up profiled up to its API opening, under this machine's own CPU
    (bench/boot --profile reads it off the console). None otherwise."""
    try:
        with open(cmdline) as stream:
            if "basalt.profile=1" not in stream.read().split():
                return None
    except OSError:
        return None
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    return profile


def print_profile(profile: Any, stream: Any = None) -> None:
    """The profile's costliest calls, cumulative and own time, between marker lines."""
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    # Basalt's own functions first (by their paths), then everything, paths stripped.
    stats.sort_stats("cumulative").print_stats("/basalt/", PROFILE_ROWS)
    stats.strip_dirs()
    for order in ("cumulative", "tottime"):
        stats.sort_stats(order).print_stats(PROFILE_ROWS)
    out = stream or sys.stderr
    out.write(f"machined profile begin\n{text.getvalue()}machined profile end\n")
    out.flush()


#: Seconds into PID 1's boot after which its start-up is over (end_startup), even if the
#: API never opened.
STARTUP_GC_LIMIT = 120.0


def end_startup() -> None:
    """PID 1's start-up is over: the start-up bundle is released (later imports read
    their files) and the garbage collector works on the whole heap again."""
    bundle = sys.modules.get("basalt.machined.startup_bundle")
    if bundle is not None:
        log.info("start-up over: %d modules came from the start-up bundle", bundle.release())
    gc.unfreeze()
    gc.enable()


#: The environment of PID 1 and, through it, of the services it starts: the kernel
#: passes init little more than HOME and TERM.
INIT_ENVIRONMENT = {"PATH": "/usr/bin:/usr/sbin", "LANG": "C.UTF-8"}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # Basalt uses no pydantic plugins; looking for them reads every installed package's
    # metadata, which a first boot under TCG pays for before its API opens.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if os.getpid() == 1:
        # No cyclic garbage collection while PID 1 imports its way to the API: the
        # collector would walk the growing heap of module objects over and over. Back on
        # when the API opens (_ApiOpenedNote; for what is allocated from then on), for
        # the whole heap STARTUP_GC_LIMIT seconds into the boot (end_startup).
        gc.disable()
        profile = startup_profile()
        for key, value in INIT_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(
                _UptimeFormatter("[%(uptime)12.6f] machined: %(levelname)s %(name)s: %(message)s")
            )
            handler.addFilter(_ApiOpenedNote(profile))
        log.info("PID 1: machined %s starting", _version())
        # Before any other import (no thread yet): a first boot's maintenance certificate
        # is made on another CPU meanwhile (api/certificate_helper.py).
        from .api import certificate_helper

        certificate_helper.start()
        from .platform.metal import run_as_init

        # PID 1 never exits (the kernel would panic): whatever ends the agent, even a bad
        # argument, becomes a reboot or power-off (after a console message if fatal).
        return run_as_init(lambda: agent(argv))
    return agent(argv)


#: Seconds the tasks still running when the agent ends get to finish their cancellation.
TEARDOWN_GRACE = 10.0


def _task_name(task: Any) -> str:
    """A task as a teardown warning names it: its name and where its coroutine waits."""
    coro = task.get_coro()
    frame = getattr(coro, "cr_frame", None)
    where = f" at {frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else ""
    return f"{task.get_name()}: {getattr(coro, '__qualname__', coro)}{where}"


def run_bounded(agent: Coroutine[Any, Any, int], grace: float = TEARDOWN_GRACE) -> int:
    """``asyncio.run`` with a bounded teardown. asyncio.run waits for every task to
    finish cancelling and (Python 3.11) joins every thread of the default executor, with
    no limit: one thread blocked in a read would hold PID 1 after "machined exits" and the
    machine would never reboot. Here stragglers get ``grace`` seconds, and executor
    threads are left behind (reboot(2) or the process's exit ends them)."""
    import asyncio

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(agent)
    finally:
        try:
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                _done, late = loop.run_until_complete(asyncio.wait(pending, timeout=grace))
                if late:
                    log.warning(
                        "%d tasks did not end within %g s: leaving them (%s)",
                        len(late),
                        grace,
                        ", ".join(sorted(_task_name(task) for task in late)),
                    )
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), timeout=grace))
        except (TimeoutError, RuntimeError) as exc:
            log.warning("teardown cut short: %s", exc)
        finally:
            executor = getattr(loop, "_default_executor", None)
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
            asyncio.set_event_loop(None)
            loop.close()


def _version() -> str:
    import basalt

    return basalt.__version__


if __name__ == "__main__":
    sys.exit(main())
