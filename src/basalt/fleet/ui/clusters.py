"""Clusters: the list, applying a template, and a cluster's page: its nodes live, etcd
members and leader, services per node, events and a service's logs followed live
(through the machines' links), drift, and the kubeconfig and basaltconfig (audited)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from basalt.machinery.errors import BasaltError
from basalt.machinery.roles import Role

from .. import audit, service
from .. import clusters as cl
from ..access import cluster_labels, in_scope, linked_anywhere
from ..auth import Caller, FleetRole
from ..core import Fleet
from ..db import Cluster, Machine
from .admin import ui_route
from .web import (
    FormErrors,
    Route,
    View,
    event_stream,
    form_errors,
    fragment,
    live_deadline,
    live_parts,
    render,
    sse,
    view,
)

#: Lines of a service's log shown before following it.
LOG_TAIL = 200
NODE_CALL_TIMEOUT = 10.0
#: Seconds before a node's broken event stream is opened again.
EVENTS_RETRY = 3.0


def _why(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    return str(details() if callable(details) else exc) or type(exc).__name__


def cluster_rows(fleet: Fleet, caller: Caller) -> list[dict[str, Any]]:
    linked = linked_anywhere(fleet)
    out = []
    with fleet.database.session() as session:
        for row in session.execute(select(Cluster).order_by(Cluster.name)).scalars():
            if not caller.scope.unlimited and not caller.scope.covers(
                row.name, cluster_labels(fleet, row.name)
            ):
                continue
            members = cl.members(session, row.name)
            out.append(summary(row, members, linked))
    return out


def summary(row: Cluster, members: list[Machine], linked: Any) -> dict[str, Any]:
    info = cl.cluster_info(row, members, [m.uuid for m in members if linked(m)])
    versions: dict[str, int] = {}
    for m in members:
        version = str((m.inventory or {}).get("version", "")) or "?"
        versions[version] = versions.get(version, 0) + 1
    down = sum(1 for n in info["nodes"] if not n["linked"])
    health = "failed" if row.status == "failed" else (
        "degraded" if down else ("ok" if row.status == "ready" else row.status)
    )  # fmt: skip
    return {**info, "versions": versions, "health": health, "down": down,
            "wanted": info["controlplanes"] + info["workers"]}  # fmt: skip


def install(app: FastAPI, fleet: Fleet, route: Route) -> None:
    def nodes() -> Any:
        return app.state.reconciler.nodes

    def list_page(v: View, errors: FormErrors, status: int = 200, template_text: str = "",
                  plan: dict[str, Any] | None = None) -> HTMLResponse:  # fmt: skip
        rows = cluster_rows(fleet, v.caller)
        name = "clusters_body.html" if v.htmx else "clusters.html"
        return render(v, name, status=status, clusters=rows, errors=errors,
                      template_text=template_text or EXAMPLE, plan=plan)  # fmt: skip

    @ui_route(route, "GET", "/ui/clusters", FleetRole.READER)
    def clusters(request: Request) -> HTMLResponse:
        return list_page(view(request), FormErrors())

    @ui_route(route, "GET", "/ui/clusters/live", FleetRole.READER, response_class=Response)
    async def clusters_live(request: Request) -> Response:
        v = view(request)

        def look() -> dict[str, str]:
            rows = cluster_rows(fleet, v.caller)
            return {"table": fragment("clusters_table.html", v=v, clusters=rows)}

        return event_stream(live_parts(request, look))

    @ui_route(route, "POST", "/ui/clusters", FleetRole.OPERATOR)
    async def apply(request: Request) -> Response:
        """Plan a template (``action=plan``) or apply it; errors under the text area."""
        from ..template import parse_template

        form = await request.form()
        v = view(request)
        text = str(form.get("template", ""))
        dry_run = str(form.get("action", "apply")) == "plan"
        try:
            if len(text) > 1 << 20:
                raise service.FleetError("template: larger than 1 MiB")
            if not text.strip():
                raise service.FleetError("template: paste a Cluster template (YAML) first")
            template = parse_template(text, "template")
            in_scope(v.caller, template.spec.name, fleet, dict(template.spec.labels))

            def run() -> dict[str, Any]:
                with fleet.database.session() as session:
                    return cl.apply(
                        session, v.caller, template, fleet.box, fleet.links.links, dry_run
                    )

            plan = await asyncio.to_thread(run)
        except service.Refused:  # a role or scope refusal: 403, not a field error
            raise
        except BasaltError as exc:
            return list_page(v, form_errors(exc, {"template": "template", "": "template"}),
                             400, text)  # fmt: skip
        if dry_run:
            return list_page(v, FormErrors(), 200, text, plan)
        reconciler = app.state.reconciler
        if reconciler.leading:
            reconciler.start(template.spec.name)
        target = f"/ui/clusters/{template.spec.name}"
        return Response(status_code=204, headers={"HX-Redirect": target})

    def cluster_data(name: str) -> dict[str, Any]:
        linked = linked_anywhere(fleet)
        with fleet.database.session() as session:
            row = cl.get_cluster(session, name)
            members = cl.members(session, name)
            info = summary(row, members, linked)
            by_uuid = {m.uuid: m for m in members}
            for node in info["nodes"]:
                inventory = by_uuid[node["uuid"]].inventory or {}
                node["version"] = inventory.get("version", "")
        return info

    @ui_route(route, "GET", "/ui/clusters/{name}", FleetRole.READER)
    def cluster_page(request: Request, name: str) -> HTMLResponse:
        v = view(request)
        in_scope(v.caller, name, fleet)
        return render(v, "cluster.html", c=cluster_data(name), roles=[r.value for r in Role])

    @ui_route(route, "GET", "/ui/clusters/{name}/live", FleetRole.READER, response_class=Response)
    async def cluster_live(request: Request, name: str) -> Response:
        v = view(request)
        in_scope(v.caller, name, fleet)

        def look() -> dict[str, str]:
            try:
                data = cluster_data(name)
            except service.NotFound:
                return {
                    "head": '<div id="cluster-head" class="error">this cluster was deleted</div>'
                }
            return {
                "head": fragment("cluster_head.html", v=v, c=data),
                "nodes": fragment("cluster_nodes.html", v=v, c=data),
            }

        return event_stream(live_parts(request, look))

    def linked_members(name: str, role: str = "") -> list[Machine]:
        linked = linked_anywhere(fleet)
        with fleet.database.session() as session:
            return [
                m
                for m in cl.members(session, name)
                if m.state == "allocated" and linked(m) and (not role or m.role == role)
            ]

    @ui_route(route, "GET", "/ui/clusters/{name}/etcd", FleetRole.READER)
    async def etcd(request: Request, name: str) -> HTMLResponse:
        from basalt.machinery.api import common_pb2

        v = view(request)
        in_scope(v.caller, name, fleet)
        planes = await asyncio.to_thread(linked_members, name, cl.CONTROLPLANE)
        problems: list[str] = []
        for machine in planes:
            try:
                async with nodes().client(machine.uuid, name, role=Role.READER) as client:
                    listed = await client.machine.EtcdMemberList(
                        common_pb2.Empty(), timeout=NODE_CALL_TIMEOUT
                    )
                    status = await client.machine.EtcdStatus(
                        common_pb2.Empty(), timeout=NODE_CALL_TIMEOUT
                    )
            except Exception as exc:  # the next control plane may answer
                problems.append(f"{machine.hostname or machine.uuid}: {_why(exc)}")
                continue
            members = [
                {
                    "id": f"{m.id:x}",
                    "hostname": m.hostname,
                    "peer": ", ".join(m.peer_urls),
                    "learner": m.is_learner,
                }
                for message in listed.messages
                for m in message.members
            ]
            leader = next((f"{s.leader:x}" for s in status.messages if s.leader), "")
            asked = machine.hostname or machine.uuid
            return render(v, "etcd.html", members=members, leader=leader, asked=asked,
                          problems=problems)  # fmt: skip
        if not planes:
            problems.append("no control plane of this cluster has a link now")
        return render(v, "etcd.html", members=[], leader="", asked="", problems=problems)

    @ui_route(route, "GET", "/ui/clusters/{name}/services", FleetRole.READER)
    async def services(request: Request, name: str) -> HTMLResponse:
        from basalt.machinery.api import common_pb2

        v = view(request)
        in_scope(v.caller, name, fleet)
        members = await asyncio.to_thread(linked_members, name)

        async def one(machine: Machine) -> dict[str, Any]:
            entry: dict[str, Any] = {"uuid": machine.uuid,
                                     "hostname": machine.hostname or machine.uuid[:8],
                                     "services": [], "error": ""}  # fmt: skip
            try:
                async with nodes().client(machine.uuid, name, role=Role.READER) as client:
                    answer = await client.machine.ServiceList(
                        common_pb2.Empty(), timeout=NODE_CALL_TIMEOUT
                    )
            except Exception as exc:  # one node down does not hide the others
                entry["error"] = _why(exc)
                return entry
            entry["services"] = [
                {
                    "id": s.id,
                    "state": s.state,
                    "health": s.health,
                    "message": s.message,
                    "restarts": s.restarts,
                }
                for message in answer.messages
                for s in message.services
            ]
            return entry

        per_node = await asyncio.gather(*(one(m) for m in members))
        return render(v, "services.html", cluster=name, nodes=per_node)

    @ui_route(route, "GET", "/ui/clusters/{name}/events", FleetRole.READER, response_class=Response)
    async def events(request: Request, name: str) -> Response:
        """Every linked node's events, merged, as they happen (the last few first)."""
        from basalt.machinery.api import machine_pb2

        v = view(request)
        in_scope(v.caller, name, fleet)
        members = await asyncio.to_thread(linked_members, name)
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1000)

        def put(item: dict[str, Any]) -> None:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(fragment("event_row.html", e=item))

        async def follow(machine: Machine) -> None:
            """One node's events; a stream that breaks (a node rebooting, a node still
            in maintenance) is said once and tried again."""
            host = machine.hostname or machine.uuid[:8]
            since, failed = "", ""
            while True:
                try:
                    async with nodes().client(machine.uuid, name, role=Role.READER) as client:
                        request = machine_pb2.EventsRequest(
                            follow=True, since_id=since, tail_events=0 if since else 10
                        )
                        async for event in client.machine.Events(request):
                            since, failed = event.id, ""
                            put({"host": host, "type": event.type, "actor": event.actor,
                                 "message": event.message, "at": event.timestamp})  # fmt: skip
                except Exception as exc:  # said in the stream, not raised
                    reason = _why(exc)
                    if reason != failed:
                        put({"host": host, "type": "stream", "actor": "fleet", "at": time.time(),
                             "message": f"events of {host} stopped: {reason}"})  # fmt: skip
                    failed = reason
                await asyncio.sleep(EVENTS_RETRY)

        async def stream() -> AsyncIterator[str]:
            tasks = [asyncio.create_task(follow(m)) for m in members]
            ends = live_deadline()
            try:
                yield "retry: 2000\n\n"
                if not members:
                    yield sse("append", fragment("event_row.html", e={
                        "host": "fleet", "type": "stream", "actor": "fleet", "at": time.time(),
                        "message": "no node of this cluster has a link now"}))  # fmt: skip
                while time.monotonic() < ends and not await request.is_disconnected():
                    try:
                        item = await asyncio.wait_for(queue.get(), 1.0)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    batch = [item]
                    while not queue.empty() and len(batch) < 100:
                        batch.append(queue.get_nowait())
                    yield sse("append", "\n".join(batch))
            finally:
                for task in tasks:
                    task.cancel()

        return event_stream(stream())

    @ui_route(route, "GET", "/ui/clusters/{name}/diff", FleetRole.READER)
    async def diff(request: Request, name: str) -> HTMLResponse:
        v = view(request)
        in_scope(v.caller, name, fleet)
        await asyncio.to_thread(cluster_data, name)  # 404 for an unknown cluster
        drift = await app.state.reconciler.drift(name)
        return render(v, "diff.html", nodes=drift)

    @ui_route(route, "GET", "/ui/clusters/{name}/kubeconfig", FleetRole.OPERATOR,
              response_class=Response)  # fmt: skip
    async def kubeconfig(request: Request, name: str) -> Response:
        v = view(request)
        in_scope(v.caller, name, fleet)

        def record() -> None:
            with fleet.database.session() as session:
                cl.get_cluster(session, name)
                audit.record(session, v.caller.name, "secret.read.kubeconfig", name,
                             {"via": "ui"})  # fmt: skip

        await asyncio.to_thread(record)
        data = await app.state.reconciler.kubeconfig(name)
        return Response(data, media_type="application/yaml", headers={
            "Content-Disposition": f'attachment; filename="{name}.kubeconfig"',
            "Cache-Control": "no-store"})  # fmt: skip

    @ui_route(route, "POST", "/ui/clusters/{name}/basaltconfig", FleetRole.ADMIN,
              response_class=Response)  # fmt: skip
    async def basaltconfig(request: Request, name: str) -> Response:
        form = await request.form()
        v = view(request)
        in_scope(v.caller, name, fleet)
        wanted = [str(r) for r in form.getlist("role")] or [Role.ADMIN.value]
        roles = cl.node_roles(wanted, "role")

        def make() -> str:
            with fleet.database.session() as session:
                audit.record(session, v.caller.name, "secret.read.basaltconfig", name,
                             {"roles": wanted, "via": "ui"})  # fmt: skip
                return cl.basaltconfig(session, name, fleet.box, roles)

        text = await asyncio.to_thread(make)
        return Response(text, media_type="application/yaml", headers={
            "Content-Disposition": f'attachment; filename="{name}.basaltconfig"',
            "Cache-Control": "no-store"})  # fmt: skip

    _logs(app, fleet, route)


def _logs(app: FastAPI, fleet: Fleet, route: Route) -> None:
    def find(uuid: str) -> Machine:
        with fleet.database.session() as session:
            return service.get_machine(session, uuid)

    @ui_route(route, "GET", "/ui/machines/{uuid}/logs/{service_id}", FleetRole.READER)
    async def logs_page(request: Request, uuid: str, service_id: str) -> HTMLResponse:
        v = view(request)
        machine = await asyncio.to_thread(find, uuid)
        if machine.cluster:
            in_scope(v.caller, machine.cluster, fleet)
        return render(v, "logs.html", m=machine, service=service_id)

    @ui_route(route, "GET", "/ui/machines/{uuid}/logs/{service_id}/stream", FleetRole.READER,
              response_class=Response)  # fmt: skip
    async def logs_stream(request: Request, uuid: str, service_id: str) -> Response:
        """The service's last lines, then each new one as the node writes it."""
        from basalt.machinery.api import machine_pb2

        v = view(request)
        machine = await asyncio.to_thread(find, uuid)
        if not machine.cluster:
            raise service.Conflict(f"machine {uuid} is in no cluster: its logs are read "
                                   "with the cluster's credentials")  # fmt: skip
        in_scope(v.caller, machine.cluster, fleet)
        nodes = app.state.reconciler.nodes

        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            ends = live_deadline()
            try:
                async with nodes.client(machine.uuid, machine.cluster, role=Role.READER) as client:
                    call = client.machine.Logs(
                        machine_pb2.LogsRequest(id=service_id, follow=True, tail_lines=LOG_TAIL)
                    )
                    pending = ""
                    async for chunk in call:
                        pending += chunk.bytes.decode(errors="replace")
                        lines, _, pending = pending.rpartition("\n")
                        if lines:
                            yield sse("append", fragment("log_lines.html", lines=lines.split("\n")))
                        if time.monotonic() > ends or await request.is_disconnected():
                            call.cancel()
                            return
            except Exception as exc:  # the stream says why it ended
                yield sse("append", fragment("log_lines.html",
                                             lines=[f"-- logs stopped: {_why(exc)}"]))  # fmt: skip

        return event_stream(stream())


EXAMPLE = """\
apiVersion: fleet.basalt.dev/v1alpha1
kind: Cluster
name: demo
controlPlane:
  count: 1
workers: []
"""
