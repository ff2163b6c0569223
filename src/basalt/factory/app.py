"""The standalone factory's web app (``basalt-factory serve``).

Reads need nothing; writes (posting a schematic, starting a build, uploading an
extension) and the images of secret schematics need ``Authorization: Bearer TOKEN``
when the factory has a token (``--token-file``). Without one, anyone who reaches the
factory may use it all: it listens on 127.0.0.1 by default.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from basalt.machinery.errors import BasaltError

from .core import Factory
from .errors import FactoryUnauthorized
from .routes import Access, Mount, error_response, install


def _check_token(expected: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), expected):
            raise FactoryUnauthorized(
                f"{request.method} {request.url.path} needs this factory's token",
                hint="send Authorization: Bearer TOKEN (the --token-file of basalt-factory "
                "serve; basaltctl reads it from BASALT_FACTORY_TOKEN)",
            )

    return check


def make_app(factory: Factory, token: str | None = None) -> FastAPI:
    """The factory's routes at the root; ``token`` guards writes and secret images."""
    app = FastAPI(
        title="Basalt image factory",
        version=factory.version,
        description="Builds Basalt images for schematics, once each, and serves them.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.factory = factory
    check = _check_token(token)

    @app.exception_handler(BasaltError)
    async def refused(request: Request, exc: BasaltError) -> JSONResponse:
        response = error_response(exc)
        if isinstance(exc, FactoryUnauthorized):
            response.status_code = 401
            response.headers["www-authenticate"] = "Bearer"
        return response

    def route(method: str, path: str, access: Access, **kwargs: Any) -> Callable[[Any], Any]:
        dependencies = list(kwargs.pop("dependencies", []))
        if access == "write":
            dependencies.append(Depends(check))
        return app.api_route(path, methods=[method], dependencies=dependencies, **kwargs)

    install(route, factory, Mount("", {"read": "read", "write": "write"}, guard_secret=check))
    return app


__all__ = ["make_app"]
