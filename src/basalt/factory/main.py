"""``basalt-factory``: the self-hostable image factory.

    basalt-factory serve [--listen HOST:PORT] [--state DIR] [--lock FILE]
                         [--signing-key PREFIX.key] [--extension-key PUB.pem ...]
                         [--token-file FILE]

Listens on 127.0.0.1:8080 by default (plain HTTP: put a TLS proxy in front to offer it
further), keeps its state under the repository's ``_out/factory`` and builds the Basalt
version it is part of from the repository's ``image.lock``. docs/factory.md describes it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path

from basalt.machinery.errors import BasaltError

from .errors import ListenError

DEFAULT_LISTEN = "127.0.0.1:8080"


def default_state() -> Path:
    from basalt.imager.lock import REPO_ROOT

    return REPO_ROOT / "_out" / "factory"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="basalt-factory", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="build and serve images for schematics")
    serve.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT [{DEFAULT_LISTEN}]")
    serve.add_argument("--state", type=Path, help="state directory [_out/factory in the repo]")
    serve.add_argument("--lock", type=Path, help="image.lock to build from [the repo's]")
    serve.add_argument(
        "--signing-key",
        type=Path,
        help="PREFIX.key from 'basaltctl gen signing-key': images also get bundle.tar",
    )
    serve.add_argument(
        "--extension-key",
        type=Path,
        action="append",
        default=[],
        help="a public key (PUB.pem) trusted to sign custom extensions; repeat for more",
    )
    serve.add_argument(
        "--token-file",
        type=Path,
        help="a file holding a token that writes (and secret schematics' images) need",
    )
    serve.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


def listen_socket(
    host: str, port: int, *, what: str = "the factory", backlog: int = 256
) -> socket.socket:
    """A non-blocking TCP socket listening on ``host:port`` for an HTTP server (uvicorn's
    ``sockets=``); :class:`ListenError` naming ``what`` when it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets; without it
    # Nagle and the client's delayed ACK hold the end of most responses ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"cannot serve {what} on {host}:{port}: {exc.strerror}",
            hint="pick another address or port with --listen HOST:PORT",
        ) from None
    sock.setblocking(False)
    return sock


def _token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise BasaltError(f"--token-file {path}: {exc.strerror}") from None
    if not token:
        raise BasaltError(f"--token-file {path} is empty", hint="put a long random token in it")
    return token


async def _serve(args: argparse.Namespace, host: str, port: int) -> None:
    import uvicorn

    from basalt.imager.lock import DEFAULT_LOCK

    from .app import make_app
    from .core import Factory, FactoryOptions

    options = FactoryOptions(
        state=args.state or default_state(),
        lock=args.lock or DEFAULT_LOCK,
        signing_key=args.signing_key,
        extension_keys=tuple(args.extension_key),
    )
    if not options.lock.is_file():
        raise BasaltError(
            f"no image.lock at {options.lock}: the factory builds from one",
            hint="run from a Basalt checkout, or pass --lock FILE",
        )
    factory = Factory(options)
    app = make_app(factory, _token(args.token_file))
    sock = listen_socket(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    logging.getLogger("basalt.factory").info(
        "basalt-factory %s on http://%s:%d, state in %s%s",
        factory.version,
        host,
        port,
        options.state,
        "" if args.token_file else " (no token: anyone who reaches it may post)",
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        await asyncio.to_thread(factory.close)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"basalt-factory: --listen {args.listen!r}: expected HOST:PORT", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(args, host.strip("[]"), int(port)))
    except BasaltError as exc:
        print(f"basalt-factory: {exc.render()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
