"""machined's entry point: parse the platform arguments, boot, run until reboot/shutdown."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import signal
import sys
from pathlib import Path

from basalt.machinery.launch import EXIT_FATAL

log = logging.getLogger("machined")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="machined", description="The Basalt node agent.")
    parser.add_argument(
        "--platform",
        choices=["container"],
        default="container",
        help="container: a process on a host (metal is PID 1 on a machine)",
    )
    parser.add_argument(
        "--node-dir",
        type=Path,
        required=True,
        help="the node's filesystem view (STATE, EPHEMERAL live below it)",
    )
    parser.add_argument("--address", required=True, help="the address the node serves on")
    parser.add_argument("--hostname", required=True, help="the node's name unless config sets one")
    parser.add_argument(
        "--cert-validity",
        type=float,
        default=24 * 3600,
        help="node certificate lifetime in seconds",
    )
    parser.add_argument("--announce-interval", type=float, default=10.0)
    parser.add_argument("--member-ttl", type=float, default=60.0)
    return parser.parse_args(argv)


class _BufferHandler(logging.Handler):
    def __init__(self, buffer: object) -> None:
        super().__init__()
        self.buffer = buffer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.buffer.append(self.format(record).encode())  # type: ignore[attr-defined]
        except Exception:
            self.handleError(record)


async def run(args: argparse.Namespace) -> int:
    from .node import Node, Tuning
    from .platform import NodePaths, Platform, PlatformMode
    from .sequencer import SequenceConflictError
    from .sequencer.sequences import boot, shutdown

    platform = Platform(
        mode=PlatformMode(args.platform),
        paths=NodePaths.under(args.node_dir.resolve()),
        address=args.address,
        hostname=args.hostname,
    )
    tuning = Tuning(
        cert_validity=dt.timedelta(seconds=args.cert_validity),
        announce_interval=args.announce_interval,
        member_ttl=args.member_ttl,
    )
    node = Node(platform, tuning)
    handler = _BufferHandler(node.agent_log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)

    def on_signal(signum: int) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        try:
            node.sequencer.start(shutdown)
        except SequenceConflictError:
            node.finish("shutdown")

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    boot_task = node.sequencer.start(boot)

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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    args = parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
