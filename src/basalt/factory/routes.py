"""The factory's HTTP routes, installed by a host: ``basalt-factory serve`` (``app.py``)
or ``basalt-fleet`` (under ``/factory/``, with its roles).

Each route is declared with an access, ``read`` or ``write``, and the host's ``route``
function turns it into its own guard: the standalone factory asks writes for its token
(when it has one); the fleet asks a fleet role (a reader reads, an operator writes).
Images of a *secret* schematic (one that carries a join token) also pass the host's
``guard_secret``.

Routes (below the mount's prefix)::

    GET  /                                 the index page (HTML)
    GET  /factory.css                      its stylesheet
    GET  /schematics                       every schematic (JSON; secrets redacted)
    POST /schematics                       a schematic's YAML -> {"id": ...} (201 new, 200 known)
    GET  /schematics/ID                    one schematic and its images
    GET  /builds/ID/VERSION                an image's build: state, queue position, stage
    POST /builds/ID/VERSION                build it (again, after a failure)
    GET  /image/ID/VERSION/NAME            an artefact: 200/206/304/416, or 202 while it builds
    GET  /extensions                       the custom extension registry (JSON)
    POST /extensions                       a signed extension file -> its sha256

Progress: an artefact asked for before its image is built answers ``202 Accepted`` with
``Retry-After``, ``Location: .../builds/ID/VERSION`` and the build's status as JSON (the
same body as the status route); the build was queued by that request (or was already).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from basalt.machinery.errors import HTTP_STATUS, BasaltError, ConfigSyntaxError
from basalt.machinery.schematic import Schematic, SchematicError

from .builds import BuildStatus
from .core import MAX_EXTENSION_BYTES, MAX_SCHEMATIC_BYTES, Factory, syntax_problem
from .errors import RequestTooLarge
from .files import artefact_response
from .page import render_index, stylesheet
from .redact import is_secret

Access = Literal["read", "write"]
#: The host's route declarer: route(method, path, role, **fastapi_kwargs) -> decorator.
RouteDeclarer = Callable[..., Callable[[Any], Any]]
#: Seconds a client waits before it asks again about a build.
RETRY_AFTER = 2


def error_response(exc: BasaltError) -> JSONResponse:
    """A refusal as the fleet's REST API answers one: ``{"detail", "hint"}``."""
    body: dict[str, Any] = {"detail": str(exc)}
    if exc.hint:
        body["hint"] = exc.hint
    return JSONResponse(body, status_code=HTTP_STATUS.get(exc.kind, 400))


def schematic_problems(exc: SchematicError | ConfigSyntaxError) -> dict[str, Any]:
    """Every problem of a schematic that does not validate, by field (the 422 body)."""
    if isinstance(exc, SchematicError):
        problems = [
            {"path": p.path, "line": p.line, "message": p.message, "hint": p.hint}
            for p in exc.problems
        ]
    else:
        problems = [syntax_problem(exc)]
    return {"detail": str(exc).splitlines()[0], "hint": exc.hint, "problems": problems}


@dataclass(frozen=True)
class Mount:
    """Where and how a host installs the factory's routes."""

    #: "" (the standalone factory), "/factory" or "/ui/factory" (the fleet).
    prefix: str
    #: What the host's route() takes for each access (a fleet role, or the access).
    roles: Mapping[Access, Any]
    #: Raises a BasaltError when the caller may not fetch a secret schematic's image.
    guard_secret: Callable[[Request], None] | None = None
    #: Records a change (the fleet's audit log): (request, action, target, detail).
    record: Callable[[Request, str, str, dict[str, Any]], None] | None = None
    #: Install only the GET routes (the fleet's web UI: a browser reads).
    reads_only: bool = False
    include_in_schema: bool = True


_YAML_BODY = {
    "requestBody": {
        "required": True,
        "description": "the schematic (YAML)",
        "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "text/plain": {"schema": {"type": "string"}},
        },
    }
}
_FILE_BODY = {
    "requestBody": {
        "required": True,
        "description": "a signed extension file (basaltctl extension build)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
_BINARY = {
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
}
_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {**_BINARY, "description": "the artefact (ETag: its sha256 in quotes)"},
    202: {"description": "the image is being built: its status (Retry-After, Location)"},
    206: {**_BINARY, "description": "one range of the artefact (Content-Range)"},
    304: {"description": "If-None-Match holds the artefact's ETag"},
    416: {
        "content": {"text/plain": {"schema": {"type": "string"}}},
        "description": "the range is outside the file (Content-Range: bytes */SIZE)",
    },
}
_POSTED: dict[int | str, dict[str, Any]] = {
    200: {"description": "the same schematic was posted before: its id"},
    422: {"description": "the schematic does not validate: problems by field"},
}
_STARTED: dict[int | str, dict[str, Any]] = {
    200: {"description": "the image is built: its status"},
    202: {"description": "the build is queued or under way: its status"},
}


async def read_limited(request: Request, limit: int, what: str) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(what, limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(what, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(what: str, limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"the {what} is larger than {limit} bytes", hint=f"a {what} is smaller")


@dataclass(frozen=True)
class _Host:
    """The factory, where its routes are mounted and the host's declarer."""

    route: RouteDeclarer
    factory: Factory
    mount: Mount

    def declare(
        self, method: str, path: str, access: Access, **kwargs: Any
    ) -> Callable[[Any], Any]:
        if self.mount.reads_only and method != "GET":
            return lambda handler: handler
        kwargs.setdefault("include_in_schema", self.mount.include_in_schema)
        return self.route(method, self.mount.prefix + path, self.mount.roles[access], **kwargs)

    def links(self, schematic: Schematic) -> dict[str, Any]:
        return self.factory.links(schematic.id, self.mount.prefix)

    def record(self, request: Request, action: str, target: str, detail: dict[str, Any]) -> None:
        if self.mount.record is not None:
            self.mount.record(request, action, target, detail)


def install(route: RouteDeclarer, factory: Factory, mount: Mount) -> None:
    """Declare the factory's routes with the host's ``route``."""
    host = _Host(route, factory, mount)
    _pages(host)
    _schematics(host)
    _images(host)
    _extensions(host)


def _pages(host: _Host) -> None:
    factory, prefix, declare = host.factory, host.mount.prefix, host.declare

    @declare(
        "GET",
        "/",
        "read",
        response_class=Response,
        responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}},
    )
    def factory_index() -> HTMLResponse:
        """The index page: schematics, their images' build state and artefacts."""
        return HTMLResponse(render_index(factory.index(), prefix))

    @declare(
        "GET",
        "/factory.css",
        "read",
        response_class=Response,
        responses={200: {"content": {"text/css": {"schema": {"type": "string"}}}}},
    )
    def factory_stylesheet() -> Response:
        return Response(
            stylesheet(), media_type="text/css", headers={"cache-control": "public, max-age=3600"}
        )


def _schematics(host: _Host) -> None:
    factory, declare, links, record = host.factory, host.declare, host.links, host.record

    @declare("GET", "/schematics", "read")
    def list_schematics() -> list[dict[str, Any]]:
        """Every schematic with its images (kernel arguments with secrets redacted)."""
        return factory.index()["schematics"]  # type: ignore[no-any-return]

    @declare(
        "POST",
        "/schematics",
        "write",
        status_code=201,
        responses=_POSTED,
        openapi_extra=_YAML_BODY,
    )
    async def post_schematic(request: Request) -> Response:
        """Store a schematic (YAML body); its id. The same schematic again: 200, same id."""
        body = await read_limited(request, MAX_SCHEMATIC_BYTES, "schematic")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            problem = {
                "path": "",
                "line": None,
                "message": "the body is not UTF-8 text",
                "hint": "send the schematic's YAML file as it is",
            }
            return JSONResponse(
                {"detail": problem["message"], "hint": problem["hint"], "problems": [problem]},
                status_code=422,
            )
        try:
            schematic, created = factory.add_schematic(text)
        except (SchematicError, ConfigSyntaxError) as exc:
            return JSONResponse(schematic_problems(exc), status_code=422)
        if created:
            record(
                request,
                "factory.schematic.create",
                schematic.id,
                {"extensions": list(schematic.extensions), "secret": is_secret(schematic)},
            )
        answer = {"id": schematic.id, "created": created, **links(schematic)}
        return JSONResponse(answer, status_code=201 if created else 200)

    @declare("GET", "/schematics/{schematic_id}", "read")
    def get_schematic(schematic_id: str) -> dict[str, Any]:
        schematic = factory.schematic(schematic_id)
        return {**factory.schematic_info(schematic), **links(schematic)}


def _images(host: _Host) -> None:
    factory, prefix, declare, record = host.factory, host.mount.prefix, host.declare, host.record

    @declare("GET", "/builds/{schematic_id}/{version}", "read")
    def build_status(schematic_id: str, version: str) -> dict[str, Any]:
        """An image's build: state (none, queued, building, done, failed), position in
        the queue, the stage being built, stages done of the total, builds run, error."""
        return factory.status(schematic_id, version).to_json()

    @declare(
        "POST", "/builds/{schematic_id}/{version}", "write", status_code=202, responses=_STARTED
    )
    def start_build(request: Request, schematic_id: str, version: str) -> JSONResponse:
        """Build the image unless it is built, queued or building (again after a failure)."""
        before = factory.status(schematic_id, version)
        status = factory.start_build(schematic_id, version)
        if status.state == "queued" and before.state != "queued":
            record(request, "factory.build", f"{schematic_id}/{version}", {})
        return JSONResponse(status.to_json(), status_code=200 if status.state == "done" else 202)

    @declare(
        "GET",
        "/image/{schematic_id}/{version}/{name}",
        "read",
        response_class=Response,
        responses=_IMAGE_RESPONSES,
    )
    def image_file(request: Request, schematic_id: str, version: str, name: str) -> Response:
        """An artefact of the image (vmlinuz, initrd.img, disk.raw.zst, disk.qcow2,
        bundle.tar); the first request builds the image (202 until it is built)."""
        started = time.perf_counter()
        guard = host.mount.guard_secret
        if guard is not None and is_secret(factory.schematic(schematic_id)):
            guard(request)
        found = factory.artefact(schematic_id, version, name)
        if isinstance(found, BuildStatus):
            headers = {
                "retry-after": str(RETRY_AFTER),
                "location": f"{prefix}/builds/{schematic_id}/{version}",
            }
            return JSONResponse(found.to_json(), status_code=202, headers=headers)
        return artefact_response(found, request.headers, started)


def _extensions(host: _Host) -> None:
    factory, declare, record = host.factory, host.declare, host.record

    @declare("GET", "/extensions", "read")
    def list_extensions() -> list[dict[str, Any]]:
        """The custom extensions a schematic may name by sha256."""
        return [e.to_json() for e in factory.store.list_extensions()]

    @declare(
        "POST",
        "/extensions",
        "write",
        status_code=201,
        openapi_extra=_FILE_BODY,
        responses={200: {"description": "the same extension was taken before"}},
    )
    async def post_extension(request: Request) -> JSONResponse:
        """Keep a signed extension file (verified against the trusted keys) by its sha256."""
        upload = factory.new_upload()
        try:
            total = 0
            with upload.open("wb") as sink:
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > MAX_EXTENSION_BYTES:
                        raise _too_large("extension file", MAX_EXTENSION_BYTES)
                    await anyio.to_thread.run_sync(sink.write, chunk)
            described, new = await anyio.to_thread.run_sync(factory.add_extension, upload)
        finally:
            upload.unlink(missing_ok=True)
        if new:
            record(
                request,
                "factory.extension.add",
                described.sha256,
                {"name": described.name, "version": described.version},
            )
        return JSONResponse(described.to_json(), status_code=201 if new else 200)


__all__ = ["Access", "Mount", "error_response", "install", "schematic_problems"]
