"""Fetching an upgrade bundle over HTTP(S) on the node itself (``upgrade --image URL``).

Only ``http`` and ``https`` URLs; HTTPS is checked against the machine's CA store like
any client. Transport security is not what makes a bundle trustworthy: the bundle is
verified against the node's trusted signing keys after the download, exactly as an
uploaded one, and refused before anything is written if it does not verify. Redirects
are followed (to http(s) only); the size limit applies while downloading.
"""

from __future__ import annotations

import asyncio
import http.client
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

from basalt.machinery.errors import BasaltError, ErrorKind

__all__ = ["BundleFetchError", "BundleURLError", "check_url", "fetch"]

CHUNK = 256 * 1024
TIMEOUT = 30.0
_RETRY = "the server or the network cut the download short; nothing was written: try again"


class BundleFetchError(BasaltError):
    """The node could not fetch the bundle; the message names the URL and the reason."""

    kind = ErrorKind.UNAVAILABLE


class BundleURLError(BundleFetchError):
    """The URL itself is not one the node fetches (scheme, host)."""

    kind = ErrorKind.INVALID_ARGUMENT


def check_url(url: str) -> str:
    """``url`` if it is an absolute http(s) URL with a host, else BundleFetchError."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise BundleURLError(
            f"bundle URL {url!r} is not an http:// or https:// URL with a host",
            hint="give --image https://HOST/PATH/bundle.tar, or a local file to upload",
        )
    return url


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str):  # type: ignore[no-untyped-def]
        check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(url: str) -> Any:
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "basalt-machined"})
    try:
        return opener.open(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        raise BundleFetchError(
            f"fetching {url}: HTTP {exc.code} {exc.reason}",
            hint="check the URL; the node fetches it itself, from its own network",
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BundleFetchError(
            f"fetching {url}: {reason}",
            hint="the node fetches the URL itself: it must resolve and reach the host, "
            "and trust its certificate (https)",
        ) from None


def _announced_length(response: Any) -> int | None:
    """The body's length from Content-Length, when the server gave one that parses."""
    value = response.headers.get("Content-Length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


async def fetch(url: str) -> AsyncIterator[bytes]:
    """The body of ``url`` in chunks; network reads run in a thread.

    A body that ends before its Content-Length is refused here (http.client reports a
    closed connection as a short read, not as an error), so a cut download never reaches
    verification looking like a whole one; verification would refuse it too, but could
    only say the tar file is truncated, not that the download was cut."""
    check_url(url)
    response = await asyncio.to_thread(_open, url)
    announced = _announced_length(response)
    received = 0
    try:
        while True:
            try:
                chunk = await asyncio.to_thread(response.read, CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise BundleFetchError(
                    f"fetching {url}: the download failed after {received} bytes: {exc}",
                    hint=_RETRY,
                ) from None
            if not chunk:
                break
            received += len(chunk)
            yield chunk
    finally:
        response.close()
    if announced is not None and received < announced:
        raise BundleFetchError(
            f"fetching {url}: the download ended after {received} of the {announced} bytes "
            "its Content-Length announced",
            hint=_RETRY,
        )
