"""One guest-to-host TCP connection of a rootless QEMU node (a ``guestfwd`` ``cmd:``).

QEMU user networking runs this once for each TCP connection a guest opens to a
forwarded address (``guestfwd=tcp:10.5.0.12:50000-cmd:...``), with the guest side of
the connection on its standard input and output. The relay connects to the host-side
loopback address of the other node's forwarded port and copies bytes both ways until
both directions are closed. It only ever connects to 127.0.0.0/8.

    python -m basalt.provision.relay --cluster STATE_DIR HOST PORT

``--cluster`` is not used to relay; it marks the process as the cluster's, so that
``cluster destroy`` can find relays that outlive their QEMU.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import sys
import threading

CHUNK = 65536


def _copy(source: socket.socket, target: socket.socket) -> None:
    """Until ``source`` says EOF; then tell ``target`` no more data comes."""
    try:
        while data := source.recv(CHUNK):
            target.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)


def relay(inside: socket.socket, outside: socket.socket) -> None:
    back = threading.Thread(target=_copy, args=(outside, inside), daemon=True)
    back.start()
    _copy(inside, outside)
    back.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="basalt-relay")
    parser.add_argument("--cluster", required=True, help="the cluster's state directory")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    args = parser.parse_args(argv)
    # libslirp hands the connection over as fds 0, 1 and 2: nothing may be printed.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if not ipaddress.IPv4Address(args.host).is_loopback:
        return 2
    inside = socket.socket(fileno=os.dup(0))
    os.close(0)
    try:
        outside = socket.create_connection((args.host, args.port), timeout=10)
    except OSError:
        inside.close()
        return 1
    outside.settimeout(None)
    with inside, outside:
        relay(inside, outside)
    return 0


if __name__ == "__main__":
    sys.exit(main())
