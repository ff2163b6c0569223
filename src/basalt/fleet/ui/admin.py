"""Logging in and out, static assets, join tokens, users and the audit log."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from basalt.machinery.errors import BasaltError

from .. import audit, logins, service
from ..auth import FleetRole, Scope
from ..core import Fleet
from .web import (
    SESSION_COOKIE,
    FormErrors,
    Route,
    check_csrf,
    form_errors,
    render,
    static_file,
    static_gzip,
    view,
)

PUBLIC = "public"
#: Failed logins per client address before it must wait.
LOGIN_FAILURES = 10
LOGIN_WINDOW = 300.0


def ui_route(
    route: Route, method: str, path: str, role: Any, **kwargs: Any
) -> Callable[[Any], Any]:
    """A web UI route: HTML, not in the API document, CSRF-checked when it changes."""
    dependencies = list(kwargs.pop("dependencies", []))
    if method not in ("GET", "HEAD") and role != PUBLIC:
        dependencies.append(Depends(check_csrf))
    kwargs.setdefault("response_class", HTMLResponse)
    return route(method, path, role, include_in_schema=False, dependencies=dependencies, **kwargs)


def safe_next(target: str) -> str:
    """Only a path of the UI itself (never another site) to go to after the login."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/ui/") or "//" in target:
        return "/ui/machines"
    return target


def install(app: FastAPI, fleet: Fleet, route: Route) -> None:
    failures: dict[str, list[float]] = {}

    @ui_route(route, "GET", "/ui/static/{path:path}", PUBLIC, response_class=Response)
    def static(path: str, request: Request) -> Response:
        """The UI's assets, gzipped for a browser that takes it (they hold no secret: no
        BREACH concern, unlike pages), cached for a year under a digest-named URL."""
        found = static_file(path)
        if found is None:
            raise service.NotFound(f"/ui/static/{path}: no such file")
        headers = {
            "Cache-Control": "public, max-age=31536000, immutable",
            "Vary": "Accept-Encoding",
        }
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["Content-Encoding"] = "gzip"
            return Response(static_gzip(path), media_type=found[1], headers=headers)
        return Response(found[0], media_type=found[1], headers=headers)

    @ui_route(route, "GET", "/ui/login", PUBLIC)
    def login_page(next: str = "/ui/machines", reason: str = "") -> HTMLResponse:
        return render(None, "login.html", next=safe_next(next), errors=FormErrors(), reason=reason,
                      name="", tab="password")  # fmt: skip

    @ui_route(route, "POST", "/ui/login", PUBLIC)
    async def login(request: Request) -> Response:
        form = await request.form()
        name = str(form.get("name", "")).strip()
        password = str(form.get("password", ""))
        token = str(form.get("token", "")).strip()
        target = safe_next(str(form.get("next", "/ui/machines")))
        tab = "token" if token and not password else "password"
        client = request.client.host if request.client else "?"
        now = time.monotonic()
        if len(failures) > 10_000:  # many addresses: forget those with no recent failure
            stale = [a for a, t in failures.items() if not t or now - t[-1] >= LOGIN_WINDOW]
            for address in stale:
                del failures[address]
        recent = [t for t in failures.get(client, []) if now - t < LOGIN_WINDOW]
        failures[client] = recent

        def refused(exc: BasaltError, status: int) -> HTMLResponse:
            field = "token" if tab == "token" else "password"
            return render(None, "login.html", status=status, next=target, reason="", name=name,
                          tab=tab, errors=FormErrors({field: str(exc)}))  # fmt: skip

        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.url.netloc:
            return refused(service.Refused("a login from another site is refused"), 403)
        if len(recent) >= LOGIN_FAILURES:
            return refused(
                service.FleetError(
                    f"too many failed logins from {client}: wait a few minutes", hint=""
                ),
                429,
            )
        if not token and not name:
            missing = FormErrors({"name": "name: enter your user name"})
            return render(None, "login.html", status=400, next=target, reason="", name=name,
                          tab=tab, errors=missing)  # fmt: skip

        def check() -> logins.Opened:
            with fleet.database.session() as session:
                if token and not password:
                    return logins.login_with_token(session, token)[1]
                user = logins.check_login(session, name, password)
                return logins.open_session(session, user)

        try:
            opened = await asyncio.to_thread(check)
        except service.Unauthenticated as exc:
            failures[client].append(now)
            import logging

            logging.getLogger("basalt.fleet").info(
                "web login refused for %r from %s: %s", name or "(token)", client, exc
            )
            return refused(exc, 401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            opened.cookie,
            max_age=int(logins.SESSION_TTL.total_seconds()),
            path="/ui",
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return response

    @ui_route(route, "POST", "/ui/logout", FleetRole.READER)
    def logout(request: Request) -> Response:
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if cookie:
            with fleet.database.session() as session:
                logins.close_session(session, cookie)
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/ui", secure=True, httponly=True)
        return response

    @ui_route(route, "GET", "/ui/", FleetRole.READER, response_class=Response)
    def home() -> Response:
        return RedirectResponse("/ui/machines", status_code=303)

    _tokens(fleet, route)
    _users(fleet, route)
    _audit(fleet, route)


def _tokens(fleet: Fleet, route: Route) -> None:
    def page(request: Request, errors: FormErrors, made: dict[str, Any] | None, status: int,
             values: dict[str, str] | None = None) -> HTMLResponse:  # fmt: skip
        v = view(request)
        with fleet.database.session() as session:
            tokens = service.join_tokens(session)
        template = "tokens.html" if not v.htmx else "tokens_body.html"
        return render(v, template, status=status, tokens=tokens, errors=errors, made=made,
                      values=values or {"ttl": "1h", "uses": "1", "labels": ""})  # fmt: skip

    @ui_route(route, "GET", "/ui/join-tokens", FleetRole.OPERATOR)
    def tokens(request: Request) -> HTMLResponse:
        return page(request, FormErrors(), None, 200)

    @ui_route(route, "POST", "/ui/join-tokens", FleetRole.OPERATOR)
    async def create_token(request: Request) -> HTMLResponse:
        from basalt.machinery.durations import parse_duration

        form = await request.form()
        values = {k: str(form.get(k, "")).strip() for k in ("ttl", "uses", "labels")}
        v = view(request)
        try:
            ttl_text = values["ttl"] or "1h"
            ttl = (
                None
                if ttl_text in ("never", "0")
                else dt.timedelta(seconds=_duration(parse_duration, ttl_text, "ttl"))
            )
            try:
                uses = int(values["uses"] or "1")
            except ValueError:
                raise service.FleetError(f"uses: {values['uses']!r} is not a number") from None
            if not 1 <= uses <= 100_000:
                raise service.FleetError(f"uses: {uses} is not between 1 and 100000")
            items = [i.strip() for i in values["labels"].replace("\n", ",").split(",") if i.strip()]
            labels = service.parse_labels(items, "labels")
            with fleet.database.session() as session:
                row, token = service.create_join_token(
                    session, v.caller, ttl=ttl, uses=uses, labels=labels
                )
                made = {**service.join_token_info(row), "token": token,
                        "url": fleet.fleet_url(token)}  # fmt: skip
        except BasaltError as exc:
            names = {"ttl": "ttl", "uses": "uses", "labels": "labels"}
            return page(request, form_errors(exc, names), None, 400, values)
        return page(request, FormErrors(), made, 201)

    @ui_route(route, "POST", "/ui/join-tokens/{token_id}/revoke", FleetRole.OPERATOR)
    def revoke_token(request: Request, token_id: str) -> HTMLResponse:
        v = view(request)
        with fleet.database.session() as session:
            service.revoke_join_token(session, v.caller, token_id)
        return page(request, FormErrors(), None, 200)

    _token_images(fleet, route)


#: Official extensions offered for an installation image (the form's checkboxes).
IMAGE_EXTENSIONS = ("qemu-guest-agent",)


def _token_images(fleet: Fleet, route: Route) -> None:
    """The installation image of a join token, offered where the token is shown once
    (the fleet keeps only its hash): the token's URL goes into the image's kernel
    arguments; the page follows the factory's build and then links the files."""

    def image_part(v: Any, schematic_id: str, status: int = 200) -> HTMLResponse:
        factory = fleet.factory
        factory.schematic(schematic_id)  # 404 for an id the factory does not know
        info = factory.image_info(schematic_id, factory.version)
        links = factory.links(schematic_id, "/ui/factory")["artefacts"]
        return render(v, "token_image.html", status=status, id=schematic_id, info=info,
                      build=info["build"], links=links)  # fmt: skip

    @ui_route(route, "POST", "/ui/join-tokens/{token_id}/image", FleetRole.OPERATOR)
    async def token_image(request: Request, token_id: str) -> HTMLResponse:
        from basalt.machinery.errors import ConfigSyntaxError
        from basalt.machinery.schematic import Schematic, SchematicError

        form = await request.form()
        v = view(request)
        chosen = [str(e) for e in form.getlist("extensions") if str(e) in IMAGE_EXTENSIONS]
        customization = Schematic(extensions=tuple(chosen)).to_yaml() if chosen else ""

        def make() -> str:
            schematic, _status = fleet.join_token_image(
                v.caller.name, token_id, str(form.get("token", "")), customization
            )
            return schematic.id

        try:
            schematic_id = await asyncio.to_thread(make)
        except (SchematicError, ConfigSyntaxError) as exc:  # not from the form's choices
            raise service.FleetError(str(exc)) from None
        return image_part(v, schematic_id, 202)

    @ui_route(route, "GET", "/ui/join-tokens/image/{schematic_id}", FleetRole.OPERATOR)
    def token_image_state(request: Request, schematic_id: str) -> HTMLResponse:
        return image_part(view(request), schematic_id)


def _duration(parse: Any, text: str, where: str) -> float:
    seconds = parse(text)
    if seconds is None or seconds <= 0 or seconds > 366 * 86400:
        raise service.FleetError(
            f"{where}: {text!r} is not a duration of at most 366 days",
            hint="like 30m, 1h, 7d, or never",
        )
    return float(seconds)


def _users(fleet: Fleet, route: Route) -> None:
    def page(request: Request, errors: FormErrors, made: dict[str, str] | None, status: int,
             values: dict[str, str] | None = None) -> HTMLResponse:  # fmt: skip
        v = view(request)
        with fleet.database.session() as session:
            users = service.users(session)
            from sqlalchemy import select

            from ..db import User

            with_password = set(
                session.execute(select(User.name).where(User.password != "")).scalars()
            )
        template = "users.html" if not v.htmx else "users_body.html"
        return render(v, template, status=status, users=users, errors=errors, made=made,
                      with_password=with_password, roles=[r.value for r in FleetRole],
                      values=values or {"name": "", "role": FleetRole.READER.value,
                                        "clusters": ""})  # fmt: skip

    @ui_route(route, "GET", "/ui/users", FleetRole.ADMIN)
    def users(request: Request) -> HTMLResponse:
        return page(request, FormErrors(), None, 200)

    @ui_route(route, "POST", "/ui/users", FleetRole.ADMIN)
    async def create_user(request: Request) -> HTMLResponse:
        form = await request.form()
        values = {k: str(form.get(k, "")).strip() for k in ("name", "role", "clusters", "password")}
        v = view(request)
        try:
            clusters = tuple(c.strip() for c in values["clusters"].split(",") if c.strip())
            if values["password"]:
                logins.check_password(values["password"])
            with fleet.database.session() as session:
                user, token = service.create_user(
                    session, v.caller, values["name"], values["role"], Scope(clusters)
                )
                if values["password"]:
                    logins.set_password(session, v.caller.name, user.name, values["password"])
        except BasaltError as exc:
            values.pop("password")
            names = {"name": "name", "role": "role", "password": "password", "user": "name"}
            return page(request, form_errors(exc, names), None, 400, values)
        return page(request, FormErrors(), {"name": user.name, "token": token}, 201)

    @ui_route(route, "POST", "/ui/users/{name}/password", FleetRole.ADMIN)
    async def set_password(request: Request, name: str) -> HTMLResponse:
        form = await request.form()
        v = view(request)
        try:
            with fleet.database.session() as session:
                logins.set_password(session, v.caller.name, name, str(form.get("password", "")))
        except BasaltError as exc:
            return page(request, FormErrors({f"password-{name}": str(exc)}), None, 400)
        return page(request, FormErrors(), None, 200)


def _audit(fleet: Fleet, route: Route) -> None:
    @ui_route(route, "GET", "/ui/audit", FleetRole.ADMIN)
    def audit_log(request: Request, before: int = 0, action: str = "") -> HTMLResponse:
        from sqlalchemy import func, select

        from ..db import AuditEntry

        with fleet.database.session() as session:
            breaks = service.audit_verify(session)
            total = session.execute(select(func.count()).select_from(AuditEntry)).scalar_one()
            query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(100)
            if before > 0:
                query = query.where(AuditEntry.id < before)
            if action:
                query = query.where(AuditEntry.action.startswith(action))
            entries = [audit.as_dict(e) for e in session.execute(query).scalars()]
        v = view(request)
        return render(v, "audit.html", entries=entries, breaks=breaks, total=total,
                      action=action, before=before)  # fmt: skip
