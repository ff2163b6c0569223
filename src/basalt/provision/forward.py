"""The root-mode qemu cluster's TCP forwarder: host loopback ports -> the nodes inside the
cluster's network namespace.

    python -m basalt.provision.forward --cluster STATE_DIR --netns NAME \\
        127.0.0.11:50000=10.5.0.11:50000 ...

It binds every listening socket first, in the host's namespace (loopback addresses only:
anything else is refused), then enters the cluster's namespace with ``setns(2)``, so
every connection it opens to a node is made inside it. One process serves all nodes;
``--cluster`` marks it as the cluster's so that ``cluster destroy`` can find it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ipaddress
import os
import sys
from dataclasses import dataclass

CHUNK = 65536
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Mapping:
    host: str
    port: int
    target: str
    target_port: int

    @classmethod
    def parse(cls, text: str) -> Mapping:
        listen, sep, target = text.partition("=")
        host, _, port = listen.rpartition(":")
        target_host, _, target_port = target.rpartition(":")
        if not sep or not host or not target_host:
            raise ValueError(f"{text!r}: expected HOST:PORT=TARGET:PORT")
        if not ipaddress.IPv4Address(host).is_loopback:
            raise ValueError(f"{text!r}: the forwarder listens on loopback addresses only")
        ipaddress.IPv4Address(target_host)
        return cls(host, int(port), target_host, int(target_port))


def enter_netns(name: str) -> None:
    """Join network namespace ``name`` (``/run/netns/NAME``) for the rest of this thread."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), f"setns {name}")
    finally:
        os.close(fd)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


def handler(mapping: Mapping):  # type: ignore[no-untyped-def]
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            inner_reader, inner_writer = await asyncio.wait_for(
                asyncio.open_connection(mapping.target, mapping.target_port), 10
            )
        except (OSError, TimeoutError):
            writer.close()
            return
        await asyncio.gather(_pipe(reader, inner_writer), _pipe(inner_reader, writer))
        for stream in (writer, inner_writer):
            stream.close()

    return serve


async def run(mappings: list[Mapping], netns: str) -> None:
    servers = [
        await asyncio.start_server(handler(m), m.host, m.port, reuse_address=True) for m in mappings
    ]
    enter_netns(netns)  # listeners stay in the host's namespace; new sockets are inside
    print(f"forwarding {len(servers)} ports into {netns}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="basalt-forward")
    parser.add_argument("--cluster", required=True, help="the cluster's state directory")
    parser.add_argument("--netns", required=True)
    parser.add_argument("mapping", nargs="+", help="HOST:PORT=TARGET:PORT")
    args = parser.parse_args(argv)
    try:
        mappings = [Mapping.parse(text) for text in args.mapping]
    except ValueError as exc:
        print(f"basalt-forward: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run(mappings, args.netns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
