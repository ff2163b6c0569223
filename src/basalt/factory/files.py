"""Serving an artefact: the whole file or one range, with its entity tag.

:func:`artefact_response` decides (200, 206, 304 or 416) from the request's headers
alone, with no read of the file; :class:`FileBody` then streams the bytes in 1 MiB
reads, each in a worker thread, so a cold disk never holds the event loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .ranges import ByteRange, Unsatisfiable, etag, none_match, parse_range, range_applies
from .store import MEDIA_TYPES, ArtefactFile

CHUNK = 1 << 20


class FileBody(Response):
    """``length`` bytes of ``path`` from ``offset``, streamed."""

    def __init__(
        self,
        path: str,
        offset: int,
        length: int,
        *,
        status_code: int,
        headers: Mapping[str, str],
        media_type: str,
    ) -> None:
        self.path = path
        self.offset = offset
        self.length = length
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.body = b""
        self.init_headers({**headers, "content-length": str(length)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        if scope.get("method") == "HEAD" or self.length == 0:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        fd = await anyio.to_thread.run_sync(os.open, self.path, os.O_RDONLY)
        try:
            position, end = self.offset, self.offset + self.length
            while position < end:
                size = min(CHUNK, end - position)
                block = await anyio.to_thread.run_sync(os.pread, fd, size, position)
                if not block:  # the file shrank under us: end the body short
                    break
                position += len(block)
                await send(
                    {"type": "http.response.body", "body": block, "more_body": position < end}
                )
            if position < end:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            os.close(fd)


def artefact_response(
    artefact: ArtefactFile, headers: Mapping[str, str], started: float | None = None
) -> Response:
    """The answer to a GET of ``artefact`` with the request's ``headers``.

    ``Server-Timing: app;dur=MS`` says how long the factory took to decide (from
    ``started``, a ``time.perf_counter()`` taken when the request arrived)."""
    tag = etag(artefact.sha256)
    common: dict[str, str] = {
        "etag": tag,
        "x-content-sha256": artefact.sha256,
        "accept-ranges": "bytes",
        "cache-control": "no-cache",  # revalidate with If-None-Match: a 304 is cheap
        "content-disposition": f'attachment; filename="{artefact.name}"',
    }

    def timed(extra: dict[str, str]) -> dict[str, str]:
        if started is not None:
            elapsed = (time.perf_counter() - started) * 1000
            extra["server-timing"] = f"app;dur={elapsed:.2f}"
        return extra

    media = MEDIA_TYPES[artefact.name]
    if none_match(headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=timed(common))
    wanted: ByteRange | None = None
    if range_applies(headers.get("if-range"), tag):
        try:
            wanted = parse_range(headers.get("range"), artefact.size)
        except Unsatisfiable as exc:
            return Response(
                str(exc),
                status_code=416,
                media_type="text/plain",
                headers=timed({**common, "content-range": exc.content_range}),
            )
    path = str(artefact.path)
    if wanted is None:
        return FileBody(
            path, 0, artefact.size, status_code=200, headers=timed(common), media_type=media
        )
    extra = {**common, "content-range": wanted.content_range(artefact.size)}
    return FileBody(
        path, wanted.first, wanted.length, status_code=206, headers=timed(extra), media_type=media
    )


__all__ = ["CHUNK", "FileBody", "artefact_response"]
