"""The fleet's REST API fuzzed from its own OpenAPI document (schemathesis).

Every operation gets generated requests, with an admin's token (so the handlers run,
not only the role check) and without one. No request may answer 5xx or a response that
breaks the document; without a token every route but the public ones answers 401.
The budget follows the fuzz lane's (``FUZZ_SHORT`` in make test, more in make fuzz).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)

from basalt.fleet.core import Fleet, FleetOptions
from basalt.fleet.rest import PUBLIC, ROUTE_ROLES, make_app
from tests.fuzz.conftest import examples

_DIR = Path(tempfile.mkdtemp(prefix="basalt-fuzz-fleet-"))
FLEET = Fleet(FleetOptions(data_dir=_DIR / "fleet", port=18443))
APP = make_app(FLEET)
TOKEN = (_DIR / "fleet" / "admin-token").read_text().strip()
SCHEMA = schemathesis.openapi.from_dict(APP.openapi())
SCHEMA.app = APP

BUDGET = settings(
    max_examples=max(3, examples() // 20),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)


#: Routes as the document names them (``{path:path}`` is ``{path}`` there).
DOCUMENTED_ROLES = {(m, p.replace(":path}", "}")): r for (m, p), r in ROUTE_ROLES.items()}


@SCHEMA.parametrize()
@BUDGET
def test_no_server_error_and_responses_follow_the_document(case: Any) -> None:
    # What the issue asks of every answer: no 5xx, status codes, content types and
    # bodies as the document says. Not checked: whether a schema-valid request is
    # accepted (business rules refuse an unknown join token with a documented 4xx) or a
    # schema-invalid one refused (a repeated query parameter counts once).
    case.call_and_validate(
        headers={"Authorization": f"Bearer {TOKEN}"},
        excluded_checks=[positive_data_acceptance, negative_data_rejection],
    )


@SCHEMA.parametrize()
@BUDGET
def test_no_route_answers_without_a_token(case: Any) -> None:
    response = case.call()
    assert response.status_code < 500
    public = any(r == PUBLIC for (_m, path), r in DOCUMENTED_ROLES.items() if path == case.path)
    role = DOCUMENTED_ROLES.get((case.method.upper(), case.path))
    if not public:  # the token is checked first, whatever the method or body
        assert response.status_code == 401, (case.method, case.path, response.status_code)
    elif role is None:  # a method a public path does not have (schemathesis tries TRACE)
        assert response.status_code == 405, (case.method, case.path, response.status_code)


def test_every_route_is_in_the_document_or_deliberately_not() -> None:
    documented = {
        (method.upper(), path)
        for path, operations in APP.openapi()["paths"].items()
        for method in operations
    }
    # The web UI's pages (HTML, not API) are left out of the document on purpose.
    pages = {(m, p) for m, p in DOCUMENTED_ROLES if p.startswith("/ui/")}
    assert pages, "the web UI's routes are declared with roles too"
    assert set(DOCUMENTED_ROLES) - documented - pages == {("GET", "/openapi.json")}


@pytest.fixture(scope="module", autouse=True)
def _close() -> Any:
    yield
    FLEET.close()
