"""The machines page: search, filters, sorting and paging done by the database; bulk
label edits; rows that follow the fleet live; a machine's own page."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from basalt.machinery.errors import BasaltError

from .. import service
from ..access import in_scope, linked_anywhere
from ..auth import FleetRole
from ..core import Fleet
from ..db import Machine
from .admin import ui_route
from .web import (
    LIVE_INTERVAL,
    FormErrors,
    Route,
    View,
    event_stream,
    form_errors,
    fragment,
    live_deadline,
    render,
    sse,
    view,
)

STATES = ("free", "allocated", "releasing", "removed")
SORTS = {
    "hostname": Machine.hostname,
    "state": Machine.state,
    "cluster": Machine.cluster,
    "enrolled": Machine.enrolled,
    "seen": Machine.last_seen,
    "version": Machine.inventory["version"].as_string(),
}
PAGE_SIZES = (25, 50, 100, 200)


@dataclass(frozen=True)
class Query:
    """What the machines page shows: its URL's parameters, checked."""

    q: str = ""
    state: str = ""
    cluster: str = ""
    version: str = ""
    label: str = ""
    sort: str = "hostname"
    order: str = "asc"
    page: int = 1
    per: int = 50

    @classmethod
    def parse(cls, params: Any) -> Query:
        def text(name: str, limit: int = 200) -> str:
            return str(params.get(name, "") or "").strip()[:limit]

        def number(name: str, default: int) -> int:
            try:
                return int(params.get(name, default))
            except (TypeError, ValueError):
                return default

        state = text("state")
        sort = text("sort") or "hostname"
        per = number("per", 50)
        query = cls(
            q=text("q"),
            state=state if state in STATES else "",
            cluster=text("cluster", 63),
            version=text("version", 64),
            label=text("label", 500),
            sort=sort if sort in SORTS else "hostname",
            order="desc" if text("order") == "desc" else "asc",
            page=max(1, number("page", 1)),
            per=per if per in PAGE_SIZES else 50,
        )
        query.labels()  # a malformed selector is named now, not at the query
        return query

    def labels(self) -> dict[str, str]:
        items = [i.strip() for i in self.label.split(",") if i.strip()]
        return service.parse_labels(items, "label") if items else {}

    def url(self, **changes: Any) -> str:
        values = {**self.__dict__, **changes}
        defaults = Query().__dict__
        kept = {k: v for k, v in values.items() if v not in ("", None) and v != defaults[k]}
        return "/ui/machines" + (f"?{urlencode(kept)}" if kept else "")

    def filtered(self, statement: Select[Any]) -> Select[Any]:
        if self.q:
            pattern = f"%{self.q.replace('%', '').replace('_', '')}%"
            statement = statement.where(
                or_(Machine.hostname.ilike(pattern), Machine.uuid.like(f"{self.q.lower()}%"))
            )
        if self.state:
            statement = statement.where(Machine.state == self.state)
        else:
            statement = statement.where(Machine.state != "removed")
        if self.cluster:
            statement = statement.where(
                Machine.cluster.is_(None)
                if self.cluster == "-"
                else Machine.cluster == self.cluster
            )
        if self.version:
            statement = statement.where(Machine.inventory["version"].as_string() == self.version)
        for key, value in self.labels().items():
            statement = statement.where(Machine.labels[key].as_string() == value)
        return statement

    def rows(self, session: Session) -> tuple[int, list[Machine]]:
        total = session.execute(self.filtered(select(func.count(Machine.uuid)))).scalar_one()
        column = SORTS[self.sort]
        ordering = column.desc() if self.order == "desc" else column.asc()
        statement = (
            self.filtered(select(Machine))
            .order_by(ordering, Machine.uuid)
            .offset((self.page - 1) * self.per)
            .limit(self.per)
        )
        return int(total), list(session.execute(statement).scalars())


def machine_row(machine: Machine, connected: bool) -> dict[str, Any]:
    inventory = machine.inventory or {}
    return {
        "uuid": machine.uuid,
        "hostname": machine.hostname or inventory.get("hostname", "") or machine.uuid[:8],
        "state": machine.state,
        "cluster": machine.cluster or "",
        "role": machine.role,
        "labels": machine.labels or {},
        "connected": connected,
        "stage": inventory.get("stage", ""),
        "version": inventory.get("version", ""),
        "address": inventory.get("api_address", ""),
        "last_seen": machine.last_seen,
        "enrolled": machine.enrolled,
    }


def _page_data(fleet: Fleet, query: Query, filters: bool = True) -> dict[str, Any]:
    """The page's rows; with ``filters``, the clusters its filter offers too (the live
    stream, which swaps only the table, needs no more than the rows)."""
    linked = linked_anywhere(fleet)
    clusters: list[str] = []
    with fleet.database.session() as session:
        total, rows = query.rows(session)
        if filters:
            clusters = sorted(
                c for c in session.execute(select(Machine.cluster).distinct()).scalars() if c
            )
    pages = max(1, -(-total // query.per))
    return {
        "rows": [machine_row(m, linked(m)) for m in rows],
        "total": total,
        "pages": pages,
        "clusters": clusters,
    }


def install(app: FastAPI, fleet: Fleet, route: Route) -> None:
    def page(v: View, query: Query, errors: FormErrors, status: int = 200) -> HTMLResponse:
        data = _page_data(fleet, query)
        template = "machines_body.html" if v.htmx else "machines.html"
        return render(v, template, status=status, query=query, errors=errors, states=STATES,
                      sizes=PAGE_SIZES, **data)  # fmt: skip

    @ui_route(route, "GET", "/ui/machines", FleetRole.READER)
    def machines(request: Request) -> HTMLResponse:
        v = view(request)
        try:
            query = Query.parse(request.query_params)
        except BasaltError as exc:
            bad = Query.parse({**request.query_params, "label": ""})
            return page(v, bad, form_errors(exc, {"label": "label"}), 400)
        return page(v, query, FormErrors())

    @ui_route(route, "GET", "/ui/machines/live", FleetRole.READER, response_class=Response)
    async def machines_live(request: Request) -> Response:
        """The rows of the page this query shows, as they change: one row when a
        machine's state changes; the whole table when the set of rows does."""
        query = Query.parse(request.query_params)
        v = view(request)

        async def stream() -> AsyncIterator[str]:
            shown: dict[str, str] | None = None  # the whole table first: the page may
            ends = live_deadline()  # have changed between its rendering and now
            yield "retry: 1000\n\n"
            while time.monotonic() < ends and not await request.is_disconnected():
                data = await asyncio.to_thread(_page_data, fleet, query, False)
                rows = {r["uuid"]: fragment("machine_row.html", m=r, v=v) for r in data["rows"]}
                if shown is None or list(rows) != list(shown):
                    yield sse("swap", fragment("machines_table.html", v=v, query=query, **data))
                else:
                    changed = [html for uid, html in rows.items() if shown.get(uid) != html]
                    if changed:
                        yield sse("swap", "\n".join(changed))
                shown = rows
                await asyncio.sleep(LIVE_INTERVAL)

        return event_stream(stream())

    @ui_route(route, "POST", "/ui/machines/labels", FleetRole.OPERATOR)
    async def bulk_labels(request: Request) -> HTMLResponse:
        """Set and remove labels on the machines ticked on the page."""
        form = await request.form()
        v = view(request)
        query = Query.parse(form)
        chosen = [str(u) for u in form.getlist("machine")]
        set_text = str(form.get("set", "")).strip()
        remove_text = str(form.get("remove", "")).strip()
        try:
            if not chosen:
                raise service.FleetError("machines: tick at least one machine first")
            if not set_text and not remove_text:
                raise service.FleetError("set: name labels to set (key=value) or to remove")
            add = service.parse_labels([i.strip() for i in set_text.split(",") if i.strip()], "set")
            remove = [i.strip() for i in remove_text.split(",") if i.strip()]
            for key in remove:
                service.check_labels({key: ""}, "remove")

            def apply() -> None:
                with fleet.database.session() as session:  # all or none
                    for uuid in chosen:
                        cluster = service.get_machine(session, uuid).cluster
                        if cluster:  # machines of clusters outside the user's scope: none
                            in_scope(v.caller, cluster, fleet)
                        service.set_labels(session, v.caller, uuid, add, remove)

            await asyncio.to_thread(apply)
        except service.Refused:  # a role or scope refusal: 403, not a field error
            raise
        except BasaltError as exc:
            names = {"set": "set", "remove": "remove", "machines": "", "label": "set"}
            return page(v, query, form_errors(exc, names), 400)
        return page(v, query, FormErrors({"ok": f"labels changed on {len(chosen)} machines"}))

    @ui_route(route, "GET", "/ui/machines/{uuid}", FleetRole.READER)
    def machine_page(request: Request, uuid: str) -> HTMLResponse:
        v = view(request)
        with fleet.database.session() as session:
            row = service.get_machine(session, uuid)
        info = service.machine_info(row, linked_anywhere(fleet)(row))
        return render(v, "machine.html", m=info, row=machine_row(row, info["connected"]))

    @ui_route(route, "GET", "/ui/machines/{uuid}/stats", FleetRole.READER)
    async def machine_stats(request: Request, uuid: str) -> HTMLResponse:
        """CPU and memory over the last hour, from the node's own figures."""
        from .plots import sparkline

        v = view(request)

        def find() -> Machine:
            with fleet.database.session() as session:
                return service.get_machine(session, uuid)

        row = await asyncio.to_thread(find)
        if not row.cluster:
            return render(v, "note.html", note="figures are read through the cluster's "
                          "credentials: this machine is in no cluster")  # fmt: skip
        nodes = app.state.reconciler.nodes
        try:
            stats: dict[str, Any] = await asyncio.wait_for(nodes.stats(row.uuid, row.cluster), 10)
        except Exception as exc:  # no link, a timeout, a gRPC error: said, not raised
            return render(v, "note.html", note=f"no figures from the node now: {exc}")
        cpu = [float(x) for x in stats.get("cpu", [])]
        memory = [float(x) for x in stats.get("memory", [])]
        total = float(stats.get("memoryTotal", 0) or 0)
        cpu_line, memory_line = sparkline(cpu, 100.0), sparkline(memory, total or None)
        return render(v, "stats.html", cpu=cpu, memory=memory, total=total,
                      interval=stats.get("interval", 30), cpu_line=cpu_line,
                      memory_line=memory_line)  # fmt: skip
