"""Basalt Fleet's web UI: server-rendered pages under ``/ui/``, served by the fleet itself.

Every route is declared with the REST API's ``route(method, path, role)`` (so the role
matrix covers it); a browser authenticates with a session cookie made at login (a
password or an API token), and every change carries the session's CSRF token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from ..core import Fleet
from .web import Route

#: What a page of the UI may load and do: only the fleet's own scripts, styles and
#: streams; no framing, no form posts elsewhere, no referrer to other sites.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def install(app: FastAPI, fleet: Fleet, route: Route) -> None:
    from . import admin, clusters, machines, rollouts

    @app.middleware("http")
    async def secure_pages(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        if request.url.path.startswith("/ui/"):
            response.headers.update(SECURITY_HEADERS)
        return response

    admin.install(app, fleet, route)
    machines.install(app, fleet, route)
    clusters.install(app, fleet, route)
    rollouts.install(app, fleet, route)


__all__ = ["SECURITY_HEADERS", "install"]
