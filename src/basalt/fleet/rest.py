"""The REST API (FastAPI): for people, ``basaltctl fleet`` and other tools.

Every route is declared with :func:`route` and a role (or ``PUBLIC``), which both
enforces it and records it in ``ROUTE_ROLES``; ``tests/unit/test_fleet_rest.py`` checks
that every route of the app is in that table and tries each with each role. Errors are
``{"detail": ..., "hint": ...}`` with the field or object that was wrong named in
``detail``; a refusal changes nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from basalt.machinery.errors import HTTP_STATUS, BasaltError

from . import audit, service
from .access import cluster_labels as _cluster_labels
from .access import in_scope as _in_scope
from .access import linked_anywhere
from .auth import Caller, FleetRole, Scope
from .core import Fleet

PUBLIC = "public"
RouteRole = FleetRole | Literal["public"]
#: (method, path) -> the least role that may call it.
ROUTE_ROLES: dict[tuple[str, str], RouteRole] = {}


_bearer = HTTPBearer(auto_error=False)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(Model):
    detail: str | list[Any]
    hint: str | None = None
    #: FleetLock's error fields (its routes only).
    kind: str | None = None
    value: str | None = None


#: Every route may refuse: the document says how (schemathesis checks it does).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in (
        (400, "the request is wrong; detail names the field"),
        (401, "no or an unknown API token"),
        (403, "the caller's role or scope does not allow it"),
        (404, "no such object"),
        (409, "the fleet's state refuses it"),
        (503, "a machine's link or node is not reachable now"),
    )
}


#: A route that answers plain text (errors stay JSON).
TEXT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "text"}
}


class EnrolRequest(Model):
    token: str = Field(max_length=200)
    machine_uuid: str = Field(max_length=64)
    hostname: str = Field(default="", max_length=253)
    csr: str = Field(max_length=16384)


class EnrolResponse(Model):
    certificate: str
    ca: str
    link_port: int


class JoinTokenRequest(Model):
    ttl: float | None = Field(
        default=3600.0,
        gt=0,
        le=366 * 86400,
        description="seconds the token is valid, at most 366 days (null: until revoked)",
    )
    uses: int = Field(default=1, ge=1, le=100_000, description="how many machines may enrol")
    labels: dict[str, str] = Field(default_factory=dict)


class UserRequest(Model):
    name: str = Field(max_length=64)
    role: str
    clusters: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)


class TokenRequest(Model):
    description: str = Field(default="", max_length=200)


class PasswordRequest(Model):
    password: str = Field(
        max_length=1024, description="the new web UI password ('' removes it: API tokens only)"
    )


class OwnPasswordRequest(PasswordRequest):
    current: str = Field(
        default="", max_length=1024, description="your current password (if you have one)"
    )


def _password_answer(name: str, password: str) -> dict[str, str]:
    return {"name": name, "password": "set" if password else "removed"}


class ApplyRequest(Model):
    template: str = Field(max_length=1 << 20, description="the Cluster template (YAML)")
    source: str = Field(default="cluster.yaml", max_length=200)


class BasaltconfigRequest(Model):
    roles: list[str] = Field(default_factory=lambda: ["os:admin"])


class LabelsRequest(Model):
    set: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


def _error(exc: BasaltError) -> JSONResponse:
    status = 401 if isinstance(exc, service.Unauthenticated) else HTTP_STATUS.get(exc.kind, 400)
    body: dict[str, Any] = {"detail": str(exc)}
    if exc.hint:
        body["hint"] = exc.hint
    return JSONResponse(body, status_code=status)


def _token_of(header: str) -> str:
    """The API token of an ``Authorization`` header: ``Bearer TOKEN``, or ``Basic`` with
    the token as the password (what a FleetLock client puts in its URL)."""
    import base64
    import binascii

    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[2].strip()
    return ""


def _path_pattern(template: str) -> re.Pattern[str]:
    """A route's path as a regex: ``{name}`` is one segment, ``{name:path}`` any rest."""
    pattern = re.sub(r"\{[^}:]+:path\}", ".+", template)
    return re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", pattern) + "$")


def caller_of(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The user an ``Authorization: Bearer`` (or Basic) token belongs to; the middleware
    has checked it already."""
    known = getattr(request.state, "caller", None)
    if isinstance(known, Caller):
        return known
    if credentials is None:
        raise service.Unauthenticated(
            "this route needs an API token (Authorization: Bearer ...)",
            hint="log in with 'basaltctl fleet login URL --token TOKEN'",
        )
    fleet: Fleet = request.app.state.fleet
    with fleet.database.session() as session:
        return service.authenticate(session, credentials.credentials)


Authed = Annotated[Caller, Depends(caller_of)]


async def _authenticate(fleet: Fleet, request: Request) -> Response | None:
    """Who calls a route that is not public: their API token (any route), or on the web
    UI's routes a browser session; the refusal when neither holds (else None)."""
    token = _token_of(request.headers.get("authorization", ""))
    if not token and request.url.path.startswith("/ui/"):
        return await _browser_session(fleet, request)
    if not token:
        return _error(
            service.Unauthenticated(
                "this route needs an API token (Authorization: Bearer ...)",
                hint="log in with 'basaltctl fleet login URL --token TOKEN'",
            )
        )

    def check() -> Caller:
        with fleet.database.session() as session:
            return service.authenticate(session, token)

    try:
        request.state.caller = await asyncio.to_thread(check)
    except BasaltError as exc:
        return _error(exc)
    return None


async def _browser_session(fleet: Fleet, request: Request) -> Response | None:
    """The web UI: a browser session's cookie names the caller (and the CSRF token its
    changes carry); without a valid one, the login page (None when it is valid)."""
    from . import logins
    from .ui.web import SESSION_COOKIE, unauthenticated

    cookie = request.cookies.get(SESSION_COOKIE, "")
    if not cookie:
        return unauthenticated(request)

    def browse() -> logins.Browser:
        with fleet.database.session() as session:
            return logins.session_caller(session, cookie)

    try:
        browser = await asyncio.to_thread(browse)
    except BasaltError as exc:
        return unauthenticated(request, str(exc))
    request.state.caller, request.state.csrf = browser.caller, browser.csrf
    return None


def make_app(fleet: Fleet) -> FastAPI:
    app = FastAPI(
        title="Basalt Fleet",
        version="v1alpha1",
        description="The open fleet manager of Basalt nodes.",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.fleet = fleet

    @app.exception_handler(BasaltError)
    async def basalt_error(request: Request, exc: BasaltError) -> Response:
        return _refusal(request, exc)

    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # One route per method: name every method the path has, not the first's.
            from fastapi.routing import APIRoute

            allowed = sorted(
                {
                    method
                    for candidate in app.routes
                    if isinstance(candidate, APIRoute)
                    and candidate.path_regex.match(request.url.path)
                    for method in candidate.methods or ()
                }
            )
            headers["Allow"] = ", ".join(allowed)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    public_paths: list[re.Pattern[str]] = []

    @app.middleware("http")
    async def authenticate_first(request: Request, call_next: Callable[[Request], Any]) -> Response:
        """The token is checked before anything else of the request is read: without
        one, no route but the public ones answers anything but 401."""
        path = request.url.path
        if not public_paths:  # every route is declared by the first request
            public_paths.extend(
                _path_pattern(template)
                for (_method, template), role in ROUTE_ROLES.items()
                if role == PUBLIC
            )
        if not any(pattern.match(path) for pattern in public_paths):
            refused = await _authenticate(fleet, request)
            if refused is not None:
                return refused
        response: Response = await call_next(request)
        return response

    @app.middleware("http")
    async def timing(request: Request, call_next: Callable[[Request], Any]) -> Response:
        started = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        fleet.metrics.requests.labels(path).observe(time.perf_counter() - started)
        return response

    def route(method: str, path: str, role: RouteRole, **kwargs: Any) -> Callable[[Any], Any]:
        ROUTE_ROLES[(method, path)] = role
        dependencies = list(kwargs.pop("dependencies", []))
        if role != PUBLIC:
            needed = FleetRole(role)

            def check(caller: Annotated[Caller, Depends(caller_of)]) -> Caller:
                if not caller.role.allows(needed):
                    raise service.Refused(
                        f"{method} {path} needs {needed.value}; {caller.name} is {caller.role}"
                    )
                return caller

            dependencies.append(Depends(check))
        responses = {**ERROR_RESPONSES, **kwargs.pop("responses", {})}
        return app.api_route(
            path, methods=[method], dependencies=dependencies, responses=responses, **kwargs
        )

    _public(app, fleet, route)
    _readers(app, fleet, route)
    _operators(fleet, route)
    _admins(fleet, route)
    _clusters(app, fleet, route)
    _fleetlock(app, fleet, route)
    _rollouts(app, fleet, route)
    _factory(fleet, route)
    _web_ui(app, fleet, route)
    return app


Route = Callable[..., Callable[[Any], Any]]


def _refusal(request: Request, exc: BasaltError) -> Response:
    """A refusal as JSON; on the web UI's routes, as a page or an htmx fragment."""
    if request.url.path.startswith("/ui/"):
        from .ui.web import error_page

        return error_page(request, exc, _error(exc).status_code)
    return _error(exc)


def _web_ui(app: FastAPI, fleet: Fleet, route: Route) -> None:
    from .ui import install

    install(app, fleet, route)


class JoinImageRequest(Model):
    token: str = Field(max_length=200, description="the join token (bfj_...), shown once")
    customization: str = Field(
        default="",
        max_length=64 * 1024,
        description="a schematic (YAML) the image starts from: extensions, kernel arguments",
    )


def _factory(fleet: Fleet, route: Route) -> None:
    """The image factory at /factory/ (REST: readers read, operators post) and its reads
    at /ui/factory/ for browsers; the installation image of a join token. A secret
    schematic's image (one with a join token) is for operators only."""
    from basalt.factory.routes import Access, Mount, install, schematic_problems
    from basalt.machinery.errors import ConfigSyntaxError
    from basalt.machinery.schematic import SchematicError

    def operators_only(request: Request) -> None:
        caller = request.state.caller
        if not caller.role.allows(FleetRole.OPERATOR):
            raise service.Refused(
                f"this image carries a join token: it needs {FleetRole.OPERATOR.value}; "
                f"{caller.name} is {caller.role}"
            )

    def record(request: Request, action: str, target: str, detail: dict[str, Any]) -> None:
        with fleet.database.session() as session:
            audit.record(session, request.state.caller.name, action, target, detail)

    roles: dict[Access, FleetRole] = {"read": FleetRole.READER, "write": FleetRole.OPERATOR}
    install(route, fleet.factory, Mount("/factory", roles, operators_only, record))
    install(
        route,
        fleet.factory,
        Mount(
            "/ui/factory", roles, operators_only, record, reads_only=True, include_in_schema=False
        ),
    )

    @route(
        "POST",
        "/v1/join-tokens/{token_id}/image",
        FleetRole.OPERATOR,
        status_code=202,
        responses={422: {"description": "the customization does not validate"}},
    )
    def join_token_image(token_id: str, body: JoinImageRequest, caller: Authed) -> Response:
        """The installation image of a join token: its schematic (kernel argument
        ``basalt.fleet=`` with the token, after the customization's) is posted to the
        factory and its build started; where the image will be. The token is needed
        because the fleet keeps only its hash."""
        try:
            schematic, status = fleet.join_token_image(
                caller.name, token_id, body.token, body.customization
            )
        except (SchematicError, ConfigSyntaxError) as exc:
            return JSONResponse(schematic_problems(exc), status_code=422)
        answer = {
            "token_id": token_id,
            "schematic": schematic.id,
            "version": fleet.factory.version,
            "state": status.state,
            **fleet.factory.links(schematic.id, "/factory"),
        }
        return JSONResponse(answer, status_code=202)


def _public(app: FastAPI, fleet: Fleet, route: Route) -> None:
    """Routes without a token: health, the CA, enrolment (join token)."""

    @route("GET", "/healthz", PUBLIC)
    def healthz() -> dict[str, str]:
        return {"status": "ok", "replica": fleet.replica}

    @route("GET", "/v1/ca", PUBLIC, response_class=Response, responses=TEXT)
    def ca() -> Response:
        return PlainTextResponse(fleet.ca.crt)

    @route("POST", "/v1/enrol", PUBLIC)
    def enrol(body: EnrolRequest) -> EnrolResponse:
        with fleet.database.session() as session:
            certificate = service.enrol(
                session,
                fleet.ca,
                token=body.token,
                machine_uuid=body.machine_uuid,
                hostname=body.hostname,
                csr=body.csr,
            )
        return EnrolResponse(
            certificate=certificate,
            ca=fleet.ca.crt,
            link_port=fleet.options.effective_link_port,
        )


def _readers(app: FastAPI, fleet: Fleet, route: Route) -> None:
    """fleet:reader and up."""

    @route("GET", "/openapi.json", FleetRole.READER, include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @route("GET", "/metrics", FleetRole.READER, response_class=Response, responses=TEXT)
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        fleet.metrics.machine_counts(fleet.machine_counts)
        return Response(generate_latest(fleet.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @route("GET", "/v1/whoami", FleetRole.READER)
    def whoami(caller: Authed) -> dict[str, Any]:
        """The caller; ``password``: whether they can log in to the web UI with one."""
        from . import logins

        with fleet.database.session() as session:
            password = logins.has_password(session, caller.name)
        return {
            "name": caller.name,
            "role": caller.role.value,
            "scope": caller.scope.to_json(),
            "password": password,
        }

    @route("PUT", "/v1/whoami/password", FleetRole.READER)
    def own_password(body: OwnPasswordRequest, caller: Authed) -> dict[str, str]:
        """Set (or with '' remove) your own web UI password; ``current`` is needed when
        you have one. Your browser sessions end."""
        from . import logins

        with fleet.database.session() as session:
            logins.set_own_password(session, caller.name, body.current, body.password)
        return _password_answer(caller.name, body.password)

    @route("GET", "/v1/machines", FleetRole.READER)
    def machines(
        state: Literal["free", "allocated", "releasing", "removed"] | None = None,
        cluster: str | None = None,
        label: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[dict[str, Any]]:
        """Machines in enrolment order; ``limit``/``offset`` page through a large fleet."""
        wanted = service.parse_labels(label.split(","), "label") if label else {}
        from sqlalchemy import select

        from .db import Machine

        with fleet.database.session() as session:
            query = select(Machine).order_by(Machine.enrolled, Machine.uuid)
            if state:
                query = query.where(Machine.state == state)
            if cluster:
                query = query.where(Machine.cluster == cluster)
            if not wanted:
                query = query.offset(offset).limit(limit)
            rows = list(session.execute(query).scalars())
        if wanted:
            rows = [m for m in rows if all(m.labels.get(k) == v for k, v in wanted.items())]
            rows = rows[offset : offset + limit]
        linked = linked_anywhere(fleet)
        return [service.machine_info(m, linked(m)) for m in rows]

    @route("GET", "/v1/machines/{uuid}", FleetRole.READER)
    def machine(uuid: str) -> dict[str, Any]:
        with fleet.database.session() as session:
            row = service.get_machine(session, uuid)
        return service.machine_info(row, linked_anywhere(fleet)(row))

    @route("GET", "/v1/machines/{uuid}/version", FleetRole.READER)
    async def machine_version(uuid: str) -> dict[str, Any]:
        from google.protobuf.json_format import MessageToDict

        from basalt.machinery.api import common_pb2

        from .nodes import node_client

        # Its link here, or through the replica that holds it.
        socket = await app.state.reconciler.nodes.socket(uuid.lower())
        async with node_client(socket) as client:
            answer = await asyncio.wait_for(client.machine.Version(common_pb2.Empty()), 30)
        fleet.metrics.calls.labels("Version", "ok").inc()
        return MessageToDict(answer, preserving_proto_field_name=True)

    @route("GET", "/v1/audit/verify", FleetRole.READER)
    def audit_verify() -> dict[str, Any]:
        with fleet.database.session() as session:
            breaks = service.audit_verify(session)
            count = len(service.audit_entries(session, 1_000_000))
        return {
            "intact": not breaks,
            "entries": count,
            "breaks": [{"entry": b.entry, "reason": b.reason} for b in breaks],
        }


def _operators(fleet: Fleet, route: Route) -> None:
    """fleet:operator and up."""

    @route("GET", "/v1/join-tokens", FleetRole.OPERATOR)
    def join_tokens() -> list[dict[str, Any]]:
        with fleet.database.session() as session:
            return service.join_tokens(session)

    @route("POST", "/v1/join-tokens", FleetRole.OPERATOR, status_code=201)
    def create_join_token(body: JoinTokenRequest, caller: Authed) -> dict[str, Any]:
        ttl = dt.timedelta(seconds=body.ttl) if body.ttl is not None else None
        with fleet.database.session() as session:
            row, token = service.create_join_token(
                session, caller, ttl=ttl, uses=body.uses, labels=body.labels
            )
            info = service.join_token_info(row)
        return {**info, "token": token, "url": fleet.fleet_url(token)}

    @route("DELETE", "/v1/join-tokens/{token_id}", FleetRole.OPERATOR, status_code=204)
    def revoke_join_token(token_id: str, caller: Authed) -> Response:
        with fleet.database.session() as session:
            service.revoke_join_token(session, caller, token_id)
        return Response(status_code=204)

    @route("PATCH", "/v1/machines/{uuid}/labels", FleetRole.OPERATOR)
    def machine_labels(uuid: str, body: LabelsRequest, caller: Authed) -> dict[str, Any]:
        with fleet.database.session() as session:
            cluster = service.get_machine(session, uuid).cluster
        if cluster:  # a machine of a cluster outside the caller's scope keeps its labels
            _in_scope(caller, cluster, fleet)
        with fleet.database.session() as session:
            row = service.set_labels(session, caller, uuid, body.set, body.remove)
        return service.machine_info(row, row.uuid in fleet.links.links)


def _admins(fleet: Fleet, route: Route) -> None:
    """fleet:admin only."""

    @route("GET", "/v1/audit", FleetRole.ADMIN)
    def audit_log(after: int = 0, limit: int = 200) -> list[dict[str, Any]]:
        if not 1 <= limit <= 10_000:
            raise service.FleetError(f"limit: {limit} is not between 1 and 10000")
        with fleet.database.session() as session:
            return [audit.as_dict(e) for e in service.audit_entries(session, limit, after)]

    @route("GET", "/v1/users", FleetRole.ADMIN)
    def users() -> list[dict[str, Any]]:
        with fleet.database.session() as session:
            return service.users(session)

    @route("POST", "/v1/users", FleetRole.ADMIN, status_code=201)
    def create_user(body: UserRequest, caller: Authed) -> dict[str, Any]:
        scope = Scope(tuple(body.clusters), service.check_labels(body.labels, "labels"))
        with fleet.database.session() as session:
            user, token = service.create_user(session, caller, body.name, body.role, scope)
        return {"name": user.name, "role": user.role, "scope": user.scope, "token": token}

    @route("POST", "/v1/users/{name}/tokens", FleetRole.ADMIN, status_code=201)
    def user_token(name: str, body: TokenRequest, caller: Authed) -> dict[str, str]:
        with fleet.database.session() as session:
            token = service.user_token(session, caller, name, body.description)
        return {"name": name, "token": token}

    @route("PUT", "/v1/users/{name}/password", FleetRole.ADMIN)
    def user_password(name: str, body: PasswordRequest, caller: Authed) -> dict[str, str]:
        """Set (or with '' remove) a user's web UI password; their browser sessions end."""
        from . import logins

        with fleet.database.session() as session:
            logins.set_password(session, caller.name, name, body.password)
        return _password_answer(name, body.password)

    @route("DELETE", "/v1/machines/{uuid}", FleetRole.ADMIN)
    async def remove_machine(uuid: str, caller: Authed) -> dict[str, Any]:
        def remove() -> Any:
            with fleet.database.session() as session:
                return service.remove_machine(session, caller, uuid)

        row = await asyncio.to_thread(remove)
        link = fleet.links.links.pop(row.uuid, None)
        if link is not None:
            link.close()
        return service.machine_info(row, False)

    @route("POST", "/v1/machines/{uuid}/readmit", FleetRole.ADMIN)
    def readmit_machine(uuid: str, caller: Authed) -> dict[str, Any]:
        with fleet.database.session() as session:
            row = service.readmit_machine(session, caller, uuid)
        return service.machine_info(row, False)


def _controllers(app: FastAPI, fleet: Fleet, route: Route) -> Any:
    """This replica's leadership and forwarding, and the clusters' controller."""
    from .backups import Backups
    from .operations import Reconciler
    from .replicas import Replicas
    from .rollouts import RolloutRunner

    replicas = Replicas(fleet)
    reconciler = Reconciler(fleet, replicas)
    backups = Backups(fleet, reconciler)
    scheduled: list[asyncio.Task[None]] = []

    rollouts = RolloutRunner(
        fleet.database,
        reconciler.nodes,
        fleet.options.releases,
        leading=lambda: reconciler.leading,
    )

    async def lead() -> None:
        await reconciler.tick()
        rollouts.ensure()
        if not scheduled or scheduled[-1].done():  # snapshots take a while: not inline
            scheduled[:] = [asyncio.create_task(backups.tick(), name="backups")]

    replicas.on_leader = lead
    app.state.rollouts = rollouts
    app.state.replicas = replicas
    app.state.reconciler = reconciler
    app.state.backups = backups
    _replica_routes(route, replicas)
    _backup_routes(route, backups)
    return reconciler


def _clusters(app: FastAPI, fleet: Fleet, route: Route) -> None:
    """Clusters from templates: plan and apply, status, drift, export, secrets."""
    from . import clusters as cl
    from .template import parse_template

    reconciler = _controllers(app, fleet, route)

    def members_of(name: str) -> dict[str, Any]:
        with fleet.database.session() as session:
            row = cl.get_cluster(session, name)
            return cl.cluster_info(row, cl.members(session, name), fleet.links.links)

    @route("GET", "/v1/clusters", FleetRole.READER)
    def list_clusters(caller: Authed) -> list[dict[str, Any]]:
        from sqlalchemy import select

        from .db import Cluster

        with fleet.database.session() as session:
            rows = list(session.execute(select(Cluster).order_by(Cluster.name)).scalars())
            return [
                cl.cluster_info(r, cl.members(session, r.name), fleet.links.links)
                for r in rows
                if caller.scope.unlimited
                or caller.scope.covers(r.name, _cluster_labels(fleet, r.name))
            ]

    @route("GET", "/v1/clusters/{name}", FleetRole.READER)
    def get_cluster(name: str, caller: Authed) -> dict[str, Any]:
        _in_scope(caller, name, fleet)
        return members_of(name)

    @route("POST", "/v1/clusters", FleetRole.OPERATOR)
    async def apply_cluster(
        body: ApplyRequest, caller: Authed, dry_run: bool = False
    ) -> dict[str, Any]:
        template = parse_template(body.template, body.source)
        _in_scope(caller, template.spec.name, fleet, dict(template.spec.labels))

        def plan_and_commit() -> dict[str, Any]:
            with fleet.database.session() as session:
                return cl.apply(session, caller, template, fleet.box, fleet.links.links, dry_run)

        result = await asyncio.to_thread(plan_and_commit)
        if not dry_run and reconciler.leading:  # else the leader takes it up
            reconciler.start(template.spec.name)
        return result

    @route("DELETE", "/v1/clusters/{name}", FleetRole.OPERATOR)
    async def delete_cluster(name: str, caller: Authed) -> dict[str, Any]:
        _in_scope(caller, name, fleet)

        def mark() -> None:
            with fleet.database.session() as session:
                row = cl.get_cluster(session, name)
                row.status = "deleting"
                for machine in cl.members(session, name):
                    machine.state = "releasing"
                audit.record(session, caller.name, "cluster.delete", name)

        await asyncio.to_thread(mark)
        if reconciler.leading:
            reconciler.start(name)
        return await asyncio.to_thread(members_of, name)

    @route("GET", "/v1/clusters/{name}/diff", FleetRole.READER)
    async def cluster_diff(name: str, caller: Authed) -> dict[str, Any]:
        _in_scope(caller, name, fleet)
        await asyncio.to_thread(members_of, name)  # 404 for an unknown cluster
        nodes = await reconciler.drift(name)
        return {"cluster": name, "drifted": sum(1 for n in nodes if n["changes"]), "nodes": nodes}

    _cluster_secrets(fleet, route, reconciler)


class RestoreRequest(Model):
    snapshot: str = Field(max_length=64, description="a snapshot id from the backups list")


def _backup_routes(route: Route, backups: Any) -> None:
    fleet: Fleet = backups.fleet

    @route("GET", "/v1/clusters/{name}/backups", FleetRole.READER)
    def list_backups(name: str, caller: Authed) -> list[dict[str, Any]]:
        _in_scope(caller, name, fleet)
        with fleet.database.session() as session:
            from . import clusters as cl

            cl.get_cluster(session, name)
        result: list[dict[str, Any]] = backups.snapshots(name)
        return result

    @route("POST", "/v1/clusters/{name}/backups", FleetRole.OPERATOR, status_code=201)
    async def take_backup(name: str, caller: Authed) -> dict[str, Any]:
        _in_scope(caller, name, fleet)
        result: dict[str, Any] = await backups.take(name, caller.name)
        return result

    @route("POST", "/v1/clusters/{name}/restore", FleetRole.ADMIN)
    async def restore(name: str, body: RestoreRequest, caller: Authed) -> dict[str, Any]:
        _in_scope(caller, name, fleet)
        result: dict[str, Any] = backups.start_restore(name, body.snapshot, caller.name)
        return result


def _replica_routes(route: Route, replicas: Any) -> None:
    @route("GET", "/v1/replicas", FleetRole.READER)
    def list_replicas() -> list[dict[str, Any]]:
        """The fleet's processes, which one leads, which are alive."""
        leader = replicas.is_leader
        return [{**r, "leader": r["this"] and leader} for r in replicas.replicas()]


def _cluster_secrets(fleet: Fleet, route: Route, reconciler: Any) -> None:
    """Reads of a cluster's secrets: each one is audited."""
    from . import clusters as cl

    def secret_read(caller: Caller, name: str, what: str, detail: dict[str, Any]) -> None:
        with fleet.database.session() as session:
            cl.get_cluster(session, name)
            audit.record(session, caller.name, f"secret.read.{what}", name, detail)

    @route("GET", "/v1/clusters/{name}/export", FleetRole.ADMIN)
    def export_cluster(name: str, caller: Authed) -> dict[str, Any]:
        _in_scope(caller, name, fleet)
        secret_read(caller, name, "export", {})
        with fleet.database.session() as session:
            files = cl.export_files(session, cl.get_cluster(session, name), fleet.box)
        return {"cluster": name, "files": files}

    @route("POST", "/v1/clusters/{name}/basaltconfig", FleetRole.ADMIN)
    def cluster_basaltconfig(
        name: str, body: BasaltconfigRequest, caller: Authed
    ) -> dict[str, Any]:
        _in_scope(caller, name, fleet)
        roles = cl.node_roles(body.roles)
        secret_read(caller, name, "basaltconfig", {"roles": body.roles})
        with fleet.database.session() as session:
            text = cl.basaltconfig(session, name, fleet.box, roles)
        return {"cluster": name, "basaltconfig": text}

    @route("GET", "/v1/clusters/{name}/kubeconfig", FleetRole.OPERATOR)
    async def cluster_kubeconfig(name: str, caller: Authed) -> dict[str, Any]:
        _in_scope(caller, name, fleet)
        await asyncio.to_thread(secret_read, caller, name, "kubeconfig", {})
        data = await reconciler.kubeconfig(name)
        return {"cluster": name, "kubeconfig": data.decode()}


class ClientParams(Model):
    id: str = Field(min_length=1, max_length=253)
    group: str = Field(default="default", max_length=63)


class FleetLockRequest(Model):
    client_params: ClientParams


class RebootGroupRequest(Model):
    slots: int = Field(ge=1, le=10_000)


def _fleetlock(app: FastAPI, fleet: Fleet, route: Route) -> None:
    """FleetLock (reboot slots) and the groups' sizes."""
    from . import fleetlock

    def protocol(request: Request) -> None:
        if request.headers.get("fleet-lock-protocol", "").lower() != "true":
            raise service.FleetError(
                "FleetLock requests carry the header fleet-lock-protocol: true"
            )

    def failed(kind: str, exc: BasaltError) -> JSONResponse:
        response = _error(exc)
        body = json.loads(bytes(response.body))
        body.update(kind=kind, value=str(exc))
        return JSONResponse(body, status_code=response.status_code)

    @route("POST", "/v1/pre-reboot", FleetRole.REBOOT)
    async def pre_reboot(body: FleetLockRequest, request: Request) -> Response:
        try:
            protocol(request)

            def resolve() -> Any:
                with fleet.database.session() as session:
                    return fleetlock.resolve(
                        session, body.client_params.id, body.client_params.group
                    )

            client = await asyncio.to_thread(resolve)
            if client.peers:
                reason = await app.state.reconciler.nodes.peers_ready(client.peers, client.cluster)
                if reason:
                    raise fleetlock.SlotBusy(
                        f"group {client.group}: {reason}", hint="quorum first: try again later"
                    )

            def take() -> None:
                with fleet.database.session() as session:
                    fleetlock.take(session, client)

            await asyncio.to_thread(take)
        except BasaltError as exc:
            return failed("failed_lock", exc)
        return JSONResponse({"group": client.group, "holder": client.id})

    @route("POST", "/v1/steady-state", FleetRole.REBOOT)
    async def steady_state(body: FleetLockRequest, request: Request) -> Response:
        try:
            protocol(request)

            def give_back() -> Any:
                with fleet.database.session() as session:
                    client = fleetlock.resolve(
                        session, body.client_params.id, body.client_params.group
                    )
                    fleetlock.give_back(session, client)
                    return client

            client = await asyncio.to_thread(give_back)
        except BasaltError as exc:
            return failed("failed_unlock", exc)
        return JSONResponse({"group": client.group, "released": client.id})

    @route("GET", "/v1/reboot-groups", FleetRole.READER)
    def reboot_groups() -> list[dict[str, Any]]:
        with fleet.database.session() as session:
            return fleetlock.groups(session)

    @route("PUT", "/v1/reboot-groups/{group}", FleetRole.OPERATOR)
    def set_reboot_group(group: str, body: RebootGroupRequest, caller: Authed) -> dict[str, Any]:
        with fleet.database.session() as session:
            fleetlock.set_slots(session, caller.name, group, body.slots)
        return {"group": group, "slots": body.slots}


class RolloutRequest(Model):
    version: str = Field(min_length=1, max_length=64)
    channel: str = Field(default="stable", pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
    clusters: list[str] = Field(default_factory=list)
    policy: dict[str, Any] = Field(default_factory=dict)


class PauseRequest(Model):
    paused: bool


class ForcedPromotion(Model):
    version: str = Field(min_length=1, max_length=64)
    source: str = Field(alias="from", max_length=63)
    destination: str = Field(alias="to", max_length=63)
    repository: str = Field(default="", max_length=1000)
    short: list[str] = Field(default_factory=list, max_length=10)


class PromoteRequest(Model):
    version: str = Field(min_length=1, max_length=64)
    source: str = Field(alias="from")
    destination: str = Field(alias="to")
    force: bool = False


def _rollouts(app: FastAPI, fleet: Fleet, route: Route) -> None:
    """Rollouts in waves, the release repository the fleet serves, promotion rules."""
    from basalt.machinery.releases.repository import Repository

    from . import rollouts as ro

    def repository() -> Repository:
        if fleet.options.releases is None:
            raise service.FleetError(
                "this fleet serves no release repository",
                hint="start basalt-fleet with --releases DIR (basaltctl release init DIR)",
            )
        return Repository(fleet.options.releases)

    def covers(caller: Caller, names: list[str]) -> None:
        for name in names:
            _in_scope(caller, name, fleet)

    @route("GET", "/releases/{path:path}", PUBLIC)
    def release_file(path: str) -> Response:
        """The TUF repository as static files: metadata/ and targets/ (never keys/)."""
        from fastapi.responses import FileResponse

        root = repository().directory.resolve()
        wanted = (root / path).resolve()
        top = wanted.relative_to(root).parts[:1] if wanted.is_relative_to(root) else ()
        if top not in (("metadata",), ("targets",)) or not wanted.is_file():
            raise service.NotFound(f"/releases/{path}: no such file")
        return FileResponse(wanted)

    @route("GET", "/v1/releases", FleetRole.READER)
    def releases() -> list[dict[str, Any]]:
        return [
            {
                "channel": r.channel,
                "version": r.version,
                "arch": r.arch,
                "yanked": r.yanked,
                "via": r.via,
                "length": r.length,
            }
            for r in repository().releases()
        ]

    @route("GET", "/v1/releases/{version}/evidence", FleetRole.READER)
    def release_evidence(version: str) -> dict[str, Any]:
        """What the fleet saw of a release, and what its promotion rule still misses."""
        options = fleet.options
        with fleet.database.session() as session:
            seen = ro.evidence(session, version, dt.datetime.now(dt.UTC))
        rule = {"machines": options.promote_min_machines, "seconds": options.promote_min_seconds}
        short = ro.shortfalls(seen, options.promote_min_machines, options.promote_min_seconds)
        return {**seen, "rule": rule, "short": short}

    @route("POST", "/v1/releases/forced-promotions", FleetRole.ADMIN, status_code=201)
    def forced_promotion(body: ForcedPromotion, caller: Authed) -> dict[str, Any]:
        """Record that an admin promotes a release in a repository of their own against
        the rule (``basaltctl release promote --force``): the force is in the audit log."""
        with fleet.database.session() as session:
            entry = audit.record(
                session, caller.name, "release.promote.forced",
                f"{body.destination}/{body.version}",
                {"from": body.source, "short": body.short, "repository": body.repository},
            )  # fmt: skip
            return {"audit": entry.id}

    @route("POST", "/v1/releases/promote", FleetRole.OPERATOR)
    def promote(body: PromoteRequest, caller: Authed) -> dict[str, Any]:
        """Beta to stable only after enough machines ran it healthy long enough with no
        fallback; ``force`` skips the rule (fleet:admin only) and is audited."""
        rule = (fleet.options.promote_min_machines, fleet.options.promote_min_seconds)
        with fleet.database.session() as session:
            return ro.promote(session, caller, repository(), body.version, body.source,
                              body.destination, rule, body.force)  # fmt: skip

    _rollout_routes(fleet, route, covers, repository)


def _rollout_routes(fleet: Fleet, route: Route, covers: Any, repository: Any) -> None:
    from . import rollouts as ro

    @route("GET", "/v1/rollouts", FleetRole.READER)
    def list_rollouts() -> list[dict[str, Any]]:
        from sqlalchemy import select

        from .db import Rollout

        with fleet.database.session() as session:
            rows = session.execute(select(Rollout).order_by(Rollout.id.desc())).scalars()
            return [ro.summary(session, r) for r in rows]

    @route("GET", "/v1/rollouts/{rollout_id}", FleetRole.READER)
    def show_rollout(rollout_id: int) -> dict[str, Any]:
        with fleet.database.session() as session:
            return ro.detail(session, ro.get(session, rollout_id))

    @route("POST", "/v1/rollouts", FleetRole.OPERATOR, status_code=201)
    def create_rollout(body: RolloutRequest, caller: Authed) -> dict[str, Any]:
        policy = ro.parse_policy(body.policy)
        offered = repository().releases(body.channel)
        with fleet.database.session() as session:
            covers(caller, body.clusters)
            made = ro.create(
                session, caller.name, body.version, body.channel, offered, body.clusters, policy
            )
            covers(caller, made.clusters.get("names", []))
            return ro.summary(session, made)

    @route("GET", "/v1/rollout-pause", FleetRole.READER)
    def pause_state() -> dict[str, Any]:
        with fleet.database.session() as session:
            return {"paused": ro.all_paused(session)}

    @route("PUT", "/v1/rollout-pause", FleetRole.OPERATOR)
    def pause_all(body: PauseRequest, caller: Authed) -> dict[str, Any]:
        """Pause (or resume) every rollout: no machine starts an upgrade meanwhile."""
        with fleet.database.session() as session:
            ro.pause_all(session, caller.name, body.paused)
        return {"paused": body.paused}

    @route("POST", "/v1/rollouts/{rollout_id}/{action}", FleetRole.OPERATOR)
    def rollout_action(rollout_id: int, action: str, caller: Authed) -> dict[str, Any]:
        if action not in ("pause", "resume", "abort"):
            raise service.NotFound(f"no rollout action {action!r} (pause, resume, abort)")
        with fleet.database.session() as session:
            row = ro.get(session, rollout_id)
            covers(caller, row.clusters.get("names", []))
            return ro.summary(session, ro.set_state(session, caller.name, rollout_id, action))
