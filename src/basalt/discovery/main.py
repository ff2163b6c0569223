"""``basalt-discovery``: run the open discovery service.

    basalt-discovery serve [--listen HOST:PORT] [--metrics-listen HOST:PORT] [--state DIR]
                           [--snapshot-interval SECONDS] [--tls-cert PEM --tls-key PEM]
                           [--limit NAME=VALUE ...]

With no options it listens on 127.0.0.1:3000 in plaintext and keeps its state in memory.
docs/discovery.md describes the protocol, the limits and how to run it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from basalt.machinery.errors import BasaltError

from .limits import Limits
from .server import DiscoveryServer, ServerOptions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="basalt-discovery", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the discovery service")
    serve.add_argument("--listen", default="127.0.0.1:3000", help="HOST:PORT of the gRPC API")
    serve.add_argument("--metrics-listen", default="", help="HOST:PORT of /metrics (HTTP)")
    serve.add_argument("--state", type=Path, help="directory of the snapshot (default: none)")
    serve.add_argument(
        "--snapshot-interval", type=float, default=30.0, help="seconds between snapshots"
    )
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate chain (TLS)")
    serve.add_argument("--tls-key", type=Path, help="PEM private key (TLS)")
    serve.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change a limit, e.g. affiliates_per_cluster=200 (docs/discovery.md lists them)",
    )
    serve.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


async def _serve(options: ServerOptions) -> None:
    server = DiscoveryServer(options)
    await server.start()
    log = logging.getLogger("basalt.discovery")
    scheme = "grpcs" if options.tls_cert else "grpc"
    log.info(
        "basalt-discovery: serving %s://%s:%d%s",
        scheme,
        options.host,
        server.port,
        f", /metrics on port {server.metrics_port}" if server.metrics_port else "",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
        log.info("basalt-discovery: stopped")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"basalt-discovery: --listen {args.listen!r}: expected HOST:PORT", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("basalt-discovery: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        options = ServerOptions(
            host=host.strip("[]"),
            port=int(port),
            metrics=args.metrics_listen,
            state_dir=args.state,
            snapshot_interval=args.snapshot_interval,
            tls_cert=args.tls_cert.read_bytes() if args.tls_cert else None,
            tls_key=args.tls_key.read_bytes() if args.tls_key else None,
            limits=Limits().replace(args.limit),
        )
        asyncio.run(_serve(options))
    except BasaltError as exc:
        print(f"basalt-discovery: {exc.render()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"basalt-discovery: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
