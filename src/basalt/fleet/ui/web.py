"""What every page of the web UI shares: templates, the caller and their CSRF token,
errors shown next to the form field they name, server-sent events, static assets.

Pages are rendered on the server (Jinja2); htmx swaps parts of them and a few lines of
our own script (static/basalt.js) apply server-sent events to elements by id. Nothing
is fetched from anywhere but the fleet itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from basalt.machinery.errors import BasaltError

from ..auth import Caller, FleetRole
from ..core import Fleet
from ..service import Refused

SESSION_COOKIE = "basalt_session"
#: Seconds between two looks of a live view at the database.
LIVE_INTERVAL = 0.3
#: A live stream ends after this long; the browser reconnects (and re-authenticates).
LIVE_LIFETIME = 300.0

_STATIC = resources.files("basalt.fleet.ui") / "static"
STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    ".ico": "image/x-icon",
}


@cache
def static_file(path: str) -> tuple[bytes, str] | None:
    """A file under static/ and its content type; None for anything else."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?", path) or ".." in path:
        return None
    suffix = path[path.rfind(".") :]
    if suffix not in STATIC_TYPES:
        return None
    resource = _STATIC.joinpath(*path.split("/"))
    if not resource.is_file():
        return None
    return resource.read_bytes(), STATIC_TYPES[suffix]


@cache
def static_gzip(path: str) -> bytes:
    import gzip

    found = static_file(path)
    assert found is not None
    return gzip.compress(found[0], 9, mtime=0)


@cache
def asset(path: str) -> str:
    """The URL of a static asset with its content's digest: cached for a year."""
    found = static_file(path)
    version = hashlib.sha256(found[0]).hexdigest()[:12] if found else "missing"
    return f"/ui/static/{path}?v={version}"


def _when(value: Any) -> str:
    if not value:
        return "never"
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if isinstance(value, dt.datetime):
        stamp = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        return stamp.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


def _ago(value: Any) -> str:
    if not value:
        return "never"
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    seconds = int((dt.datetime.now(dt.UTC) - value).total_seconds())
    if seconds < 60:
        return f"{max(seconds, 0)} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def _clock(value: Any) -> str:
    """Unix seconds as the time of day (UTC), to the millisecond."""
    stamp = dt.datetime.fromtimestamp(float(value or 0), dt.UTC)
    return stamp.strftime("%H:%M:%S.%f")[:-3]


@cache
def environment() -> Any:
    from basalt.factory.page import templates

    env = templates("basalt.fleet.ui")
    env.globals["asset"] = asset
    env.filters["when"] = _when
    env.filters["ago"] = _ago
    env.filters["clock"] = _clock
    return env


@dataclass
class View:
    """The request's caller and what the templates need to know about them."""

    request: Request
    fleet: Fleet
    caller: Caller
    csrf: str

    def can(self, role: str) -> bool:
        return self.caller.role.allows(FleetRole(role))

    @property
    def htmx(self) -> bool:
        return self.request.headers.get("hx-request") == "true"


def view(request: Request) -> View:
    caller = getattr(request.state, "caller", None)
    assert isinstance(caller, Caller), "the middleware authenticates every /ui/ route"
    return View(request, request.app.state.fleet, caller, getattr(request.state, "csrf", ""))


def render(
    v: View | None, template: str, status: int = 200, headers: Mapping[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:  # fmt: skip
    text = environment().get_template(template).render(v=v, **context)
    response = HTMLResponse(text, status_code=status, headers=dict(headers or {}))
    response.headers["Cache-Control"] = "no-store"
    return response


def fragment(template: str, **context: Any) -> str:
    text: str = environment().get_template(template).render(**context)
    return text


# -- forms --------------------------------------------------------------------------------------
@dataclass
class FormErrors:
    """An error message per form field (``""``: the whole form)."""

    fields: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> str:
        return self.fields.get(name, "")

    def __bool__(self) -> bool:
        return bool(self.fields)


def form_errors(exc: BasaltError, names: Mapping[str, str]) -> FormErrors:
    """Put the error next to the field it names. Errors name their field first, as the
    CLI shows them (``labels.zone: ...``, ``policy.canary.machines: ...``); ``names``
    maps such a prefix to the form field."""
    text = str(exc)
    if exc.hint and exc.hint not in text:
        text += f" ({exc.hint})"
    head = str(exc).split(":", 1)[0].strip()
    for prefix in sorted(names, key=len, reverse=True):
        if head == prefix or head.startswith((prefix + ".", prefix + "[", prefix + " ")):
            return FormErrors({names[prefix]: text})
    return FormErrors({"": text})


async def check_csrf(request: Request) -> None:
    """A browser session's changes carry its CSRF token: in the X-CSRF-Token header
    (htmx) or the form's ``csrf`` field. API tokens are not ambient: not needed there."""
    wanted = getattr(request.state, "csrf", "")
    if not wanted:
        return
    got = request.headers.get("x-csrf-token", "")
    if not got and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        got = str((await request.form()).get("csrf", ""))
    import hmac

    if not hmac.compare_digest(got.encode(), wanted.encode()):
        raise Refused(
            "the form's CSRF token is missing or stale: nothing was changed",
            hint="reload the page and send the form again",
        )


def error_page(request: Request, exc: BasaltError, status: int) -> Response:
    """A refusal on a /ui/ route: a fragment for htmx (it shows it where the request
    said), a page for a browser."""
    caller = getattr(request.state, "caller", None)
    message = str(exc)
    if request.headers.get("hx-request") == "true":
        body = (
            f'<div class="error" role="alert">{html.escape(message)}'
            + (f'<div class="hint">{html.escape(exc.hint)}</div>' if exc.hint else "")
            + "</div>"
        )
        return HTMLResponse(body, status_code=status, headers={"HX-Reswap": "innerHTML"})
    v = None
    if isinstance(caller, Caller):
        v = View(request, request.app.state.fleet, caller, getattr(request.state, "csrf", ""))
    return render(v, "error.html", status=status, message=message, hint=exc.hint or "")


# -- server-sent events -------------------------------------------------------------------------
def live_deadline() -> float:
    """When a live stream started now ends (the browser then reconnects)."""
    import time

    return time.monotonic() + LIVE_LIFETIME


def sse(event: str, data: str, event_id: str = "") -> str:
    lines = [f"event: {event}"]
    if event_id:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {line}" for line in data.splitlines() or [""])
    return "\n".join(lines) + "\n\n"


async def live_parts(
    request: Request, look: Callable[[], dict[str, str]], interval: float = LIVE_INTERVAL
) -> AsyncIterator[str]:
    """A live view's stream: every ``interval`` seconds ``look`` (run in a thread: it
    reads the database) renders the view's parts by name; the parts that changed are
    sent as one "swap" event. The first look is sent whole: the page may be older."""
    import asyncio
    import time

    shown: dict[str, str] | None = None
    ends = live_deadline()
    yield "retry: 1000\n\n"
    while time.monotonic() < ends and not await request.is_disconnected():
        parts = await asyncio.to_thread(look)
        changed = [html for key, html in parts.items() if shown is None or shown.get(key) != html]
        if changed:
            yield sse("swap", "\n".join(changed))
        shown = parts
        await asyncio.sleep(interval)


def event_stream(source: AsyncIterator[str]) -> Response:
    from fastapi.responses import StreamingResponse

    return StreamingResponse(
        source,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


Route = Callable[..., Callable[[Any], Any]]


def unauthenticated(request: Request, reason: str = "") -> Response:
    """No session (or an ended one) on a /ui/ route: the login page, then back here."""
    from urllib.parse import quote

    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    login = f"/ui/login?next={quote(target, safe='')}"
    if reason:
        login += f"&reason={quote(reason, safe='')}"
    if request.headers.get("hx-request") == "true":
        response: Response = Response(status_code=401, headers={"HX-Redirect": login})
    elif request.method in ("GET", "HEAD") and "text/event-stream" not in request.headers.get(
        "accept", ""
    ):
        response = Response(status_code=303, headers={"Location": login})
    else:
        response = HTMLResponse(
            f'<p class="error">{html.escape(reason or "log in first")}</p>', status_code=401
        )
    if request.cookies.get(SESSION_COOKIE):
        response.delete_cookie(SESSION_COOKIE, path="/ui", secure=True, httponly=True)
    return response
