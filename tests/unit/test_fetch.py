"""The node's own download of an upgrade bundle (``upgrade --image URL``): a body cut
short is refused with what was cut, whole bodies pass through unchanged. A real HTTP
server on a loopback address of its own serves them."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from basalt.machined.fetch import BundleFetchError, fetch

BODY = bytes(range(256)) * 4096  # 1 MiB: several reads


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        if self.path.startswith("/chunked"):  # no Content-Length: not known ahead
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.path == "/chunked-cut":  # one chunk announced, half of it sent
                self.wfile.write(b"%x\r\n%s" % (len(BODY), BODY[: len(BODY) // 2]))
            else:
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        cut = {"/whole": len(BODY), "/cut": len(BODY) // 2, "/empty": 0}[self.path]
        self.wfile.write(BODY[:cut])
        self.close_connection = True


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.89", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.89:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


async def _download(url: str) -> bytes:
    return b"".join([chunk async for chunk in fetch(url)])


@pytest.mark.parametrize("path", ["/whole", "/chunked"])
def test_a_whole_body_arrives_unchanged(server: str, path: str) -> None:
    assert asyncio.run(_download(server + path)) == BODY


@pytest.mark.parametrize(("path", "received"), [("/cut", len(BODY) // 2), ("/empty", 0)])
def test_a_body_cut_short_of_its_content_length_is_refused(
    server: str, path: str, received: int
) -> None:
    with pytest.raises(BundleFetchError) as caught:
        asyncio.run(_download(server + path))
    assert caught.value.message == (
        f"fetching {server}{path}: the download ended after {received} of the "
        f"{len(BODY)} bytes its Content-Length announced"
    )
    assert "nothing was written" in (caught.value.hint or "")


def test_a_chunked_body_cut_inside_a_chunk_is_refused(server: str) -> None:
    with pytest.raises(BundleFetchError, match=r"chunked-cut: the download failed after \d+ bytes"):
        asyncio.run(_download(server + "/chunked-cut"))
