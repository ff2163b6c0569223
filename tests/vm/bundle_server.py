"""Upgrade bundles over HTTP for a QEMU guest, with nothing outside loopback on the host.

The server listens on 127.0.0.89 (a free port). The guest reaches it at
``http://10.0.2.100:8080``, an address that exists only on the guest's user network:
:func:`netdev_options` forwards it with a ``guestfwd`` whose ``cmd:`` runs
:mod:`basalt.provision.relay` once per guest connection, and ``restrict=on`` keeps the
guest from reaching anything else on or beyond the host.

It serves the ``.tar`` files of one directory, the ``.json`` and ``.tar`` files below its
``repo/`` (a release repository: ``/repo/metadata/...``, ``/repo/targets/...``), and
``/cut/NAME.tar``: the same headers
(the whole file's Content-Length) but only the first half of the body, then the
connection closes, as a download cut short would. It records what it sent.
"""

from __future__ import annotations

import http.server
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADDRESS = "127.0.0.89"
GUEST_ADDRESS = "10.0.2.100"
GUEST_PORT = 8080
CHUNK = 1 << 20


@dataclass(frozen=True)
class Served:
    path: str
    status: int
    sent: int


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, directory: Path) -> None:
        super().__init__((ADDRESS, 0), _Handler)
        self.directory = directory
        self.served: list[Served] = []


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        cut = self.path.startswith("/cut/")
        name = self.path.removeprefix("/cut/").removeprefix("/")
        path = self.server.directory / name
        if self.path.startswith("/repo/"):  # a release repository: any file below repo/
            repo = (self.server.directory / "repo").resolve()
            path = (self.server.directory / name).resolve()
            name = path.name if path.is_relative_to(repo) else "/"
        if "/" in name or not name.endswith((".tar", ".json")) or not path.is_file():
            self.send_error(404)
            self.server.served.append(Served(self.path, 404, 0))
            return
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        limit = size // 2 if cut else size
        sent = 0
        try:
            with path.open("rb") as stream:
                while sent < limit and (chunk := stream.read(min(CHUNK, limit - sent))):
                    self.wfile.write(chunk)
                    sent += len(chunk)
        finally:
            self.server.served.append(Served(self.path, 200, sent))
            self.close_connection = True


class BundleServer:
    """The ``.tar`` files of ``directory`` on 127.0.0.89, in a thread, until closed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._server = _Server(directory)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def served(self) -> list[Served]:
        return list(self._server.served)

    def guest_url(self, path: str) -> str:
        """What the guest fetches ``path`` (``/v2.tar``, ``/cut/v2.tar``) as."""
        return f"http://{GUEST_ADDRESS}:{GUEST_PORT}{path}"

    def netdev_options(self, marker: Path) -> tuple[str, ...]:
        """The guest's user network: restricted, plus the forward to this server. The
        relays name ``marker`` (``--cluster``), so the test can find and end them."""
        from basalt.provision.qemu import Forward, guest_forward

        forward = Forward(GUEST_ADDRESS, ADDRESS, GUEST_PORT, host_port=self.port)
        return ("restrict=on", guest_forward(forward, marker))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def tampered_copy(bundle: Path, out: Path, member: str = "rootfs.squashfs") -> Path:
    """``bundle`` with one byte in the middle of ``member`` flipped (same size)."""
    with tarfile.open(bundle) as tar:
        info = tar.getmember(member)
        offset = info.offset_data + info.size // 2
    out.write_bytes(bundle.read_bytes())
    with out.open("r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0xFF]))
    return out
