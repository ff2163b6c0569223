"""Basalt Fleet's web UI: server-rendered pages under ``/ui/``, served by the fleet itself.

Every route is declared with the REST API's ``route(method, path, role)`` (so the role
matrix covers it); a browser authenticates with a session cookie made at login (a
password or an API token), and every change carries the session's CSRF token.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from ..core import Fleet
from .web import Route


def install(app: FastAPI, fleet: Fleet, route: Route) -> None:
    from . import admin, clusters, machines, rollouts

    admin.install(app, fleet, route)
    machines.install(app, fleet, route)
    clusters.install(app, fleet, route)
    rollouts.install(app, fleet, route)


__all__: list[Any] = ["install"]
