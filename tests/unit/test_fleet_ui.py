"""The web UI's parts without a browser: the machines query done by the database, errors
put next to their field, the SVG plots, passwords and browser sessions, and the pages'
security (cookies, CSRF, redirects, headers) in-process against an embedded SQLite
fleet. The browser test is tests/integration/test_fleet_ui.py."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from basalt.fleet import logins, service
from basalt.fleet.auth import Caller, FleetRole, Scope, token_digest
from basalt.fleet.core import Fleet, FleetOptions
from basalt.fleet.db import ApiToken, Machine, User, WebSession, utcnow
from basalt.fleet.rest import make_app
from basalt.fleet.ui import SECURITY_HEADERS, web
from basalt.fleet.ui.machines import Query
from basalt.fleet.ui.plots import outcome_bars, progress_over_time, sparkline

ADMIN = Caller("admin", FleetRole.ADMIN)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    made = Fleet(FleetOptions(data_dir=tmp_path / "fleet", port=18443))
    yield made
    made.close()


@pytest.fixture
def api(fleet: Fleet) -> TestClient:
    return TestClient(make_app(fleet), base_url="https://testserver")


def admin_token(fleet: Fleet) -> str:
    return fleet.admin_token_path.read_text().strip()


def login(api: TestClient, fleet: Fleet) -> str:
    """Log the client in with the admin's token; the page's CSRF token."""
    answer = api.post("/ui/login", data={"token": admin_token(fleet)}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    page = api.get("/ui/machines")
    found = re.search(r'X-CSRF-Token": "([^"]+)"', page.text)
    assert found is not None
    return found[1]


def add_machines(fleet: Fleet, count: int) -> list[str]:
    made = []
    with fleet.database.session() as session:
        for index in range(count):
            uid = str(uuid.UUID(int=index + 1))
            session.add(
                Machine(
                    uuid=uid,
                    hostname=f"node-{index:03d}",
                    state="removed"
                    if index == count - 1
                    else ("allocated" if index % 3 == 0 else "free"),
                    cluster="edge" if index % 3 == 0 else None,
                    labels={"zone": "a" if index % 2 else "b", "rack": str(index % 4)},
                    inventory={"version": f"0.{index % 3}.0", "stage": "running"},
                    cert_serial="1",
                    join_token="t",
                    enrolled=utcnow() - dt.timedelta(minutes=count - index),
                )
            )
            made.append(uid)
    return made


# -- the machines query ---------------------------------------------------------------------


def test_the_machines_query_filters_sorts_and_pages_in_the_database(fleet: Fleet) -> None:
    add_machines(fleet, 31)  # the last one is removed: hidden unless asked for
    with fleet.database.session() as session:
        total, rows = Query.parse({}).rows(session)
        assert total == 30 and len(rows) == 30
        assert [m.hostname for m in rows][:3] == ["node-000", "node-001", "node-002"]
        total, rows = Query.parse({"per": "25", "page": "2"}).rows(session)
        assert total == 30 and [m.hostname for m in rows] == [
            f"node-{i:03d}" for i in range(25, 30)
        ]
        total, rows = Query.parse({"label": "zone=a, rack=1"}).rows(session)
        assert total == len(rows) and {m.labels["rack"] for m in rows} == {"1"}
        assert all(m.labels["zone"] == "a" for m in rows) and total == 8
        total, rows = Query.parse({"version": "0.1.0", "state": "free"}).rows(session)
        assert total == 10 and all(m.inventory["version"] == "0.1.0" for m in rows)
        total, rows = Query.parse({"cluster": "edge", "sort": "enrolled", "order": "desc"}).rows(
            session
        )
        assert total == 10 and rows[0].hostname == "node-027"
        total, rows = Query.parse({"q": "node-01"}).rows(session)
        assert total == 10
        total, rows = Query.parse({"q": str(uuid.UUID(int=5))}).rows(session)
        assert [m.hostname for m in rows] == ["node-004"]
        total, _ = Query.parse({"state": "removed"}).rows(session)
        assert total == 1
        total, rows = Query.parse({"sort": "version", "order": "desc", "per": "25"}).rows(session)
        assert rows[0].inventory["version"] == "0.2.0"
    # Unknown values fall back to the defaults; a bad label selector is named.
    assert Query.parse({"sort": "password", "per": "7", "page": "-3"}) == Query()
    with pytest.raises(service.FleetError, match="label"):
        Query.parse({"label": "no-equals-sign"})
    assert Query(q="x", page=2).url(page=3) == "/ui/machines?q=x&page=3"


def test_errors_go_next_to_the_field_they_name() -> None:
    names = {"policy.waves": "waves", "labels": "labels", "template": "template"}
    assert web.form_errors(service.FleetError("policy.waves: not sorted"), names).fields == {
        "waves": "policy.waves: not sorted"
    }
    assert web.form_errors(service.FleetError("labels.zone: bad", hint="h"), names).fields == {
        "labels": "labels.zone: bad (h)"
    }
    assert web.form_errors(service.FleetError("template:3: error: x"), names).fields == {
        "template": "template:3: error: x"
    }
    assert web.form_errors(service.FleetError("the fleet is busy"), names).fields == {
        "": "the fleet is busy"
    }


def test_plots_are_plain_svg_scaled_to_their_data() -> None:
    assert "not enough samples" in sparkline([1.0])
    line = sparkline([0.0, 50.0, 100.0], 100.0, width=100, height=40)
    assert "<svg" in line and 'points="0.0,38.0 50.0,20.0 100.0,2.0"' in line
    bars = outcome_bars([("0.2.0", 8, 1, 0), ("0.1.0", 3, 0, 2)])
    assert bars.count("<rect") == 4 and "8 good" in bars and "2 rolled back" in bars
    assert "no rollouts" in outcome_bars([])
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    stamps = [start + dt.timedelta(seconds=s) for s in (0, 30, 60)]
    plot = progress_over_time(stamps, stamps[1:], 4)
    assert plot.count("<polyline") == 2 and "2 of 4 machines healthy" in plot
    assert "no machine has started" in progress_over_time([], [], 4)


# -- passwords and sessions -----------------------------------------------------------------


def test_passwords_are_scrypt_hashes_checked_in_constant_time_per_user(fleet: Fleet) -> None:
    stored = logins.hash_password("correct horse battery")
    assert stored.startswith("scrypt$") and "correct" not in stored
    assert logins.password_matches("correct horse battery", stored)
    assert not logins.password_matches("correct horse batterY", stored)
    assert not logins.password_matches("x", "garbage")
    with fleet.database.session() as session:
        service.create_user(session, ADMIN, "rita", "fleet:reader", Scope())
        with pytest.raises(service.FleetError, match="at least 12"):
            logins.set_password(session, "admin", "rita", "short")
        logins.set_password(session, "admin", "rita", "correct horse battery")
    with fleet.database.session() as session:
        # One answer for a wrong password, an unknown user, and a user without one.
        for name, password in (("rita", "wrong password!"), ("nobody", "x" * 20),
                               ("admin", "anything at all")):  # fmt: skip
            with pytest.raises(service.Unauthenticated, match="user name or the password"):
                logins.check_login(session, name, password)
        assert logins.check_login(session, "rita", "correct horse battery").name == "rita"


def test_a_session_ends_on_expiry_logout_new_password_or_revoked_token(fleet: Fleet) -> None:
    with fleet.database.session() as session:
        user = session.query(User).filter_by(name="admin").one()
        by_token = logins.login_with_token(session, admin_token(fleet))[1]
        expiring = logins.open_session(session, user)
        closing = logins.open_session(session, user)
    with fleet.database.session() as session:
        browser = logins.session_caller(session, by_token.cookie)
        assert browser.caller.name == "admin" and browser.csrf == by_token.csrf
        row = session.get(WebSession, token_digest(expiring.cookie))
        assert row is not None
        row.expires = utcnow() - dt.timedelta(seconds=1)
        logins.close_session(session, closing.cookie)
    with fleet.database.session() as session:
        with pytest.raises(service.Unauthenticated, match="expired"):
            logins.session_caller(session, expiring.cookie)
        with pytest.raises(service.Unauthenticated, match="ended"):
            logins.session_caller(session, closing.cookie)
        for token in session.query(ApiToken).all():
            token.revoked = True
    with (
        fleet.database.session() as session,
        pytest.raises(service.Unauthenticated, match="revoked"),
    ):
        logins.session_caller(session, by_token.cookie)


# -- the pages' security, in-process --------------------------------------------------------


def test_login_sets_a_strict_cookie_and_pages_carry_security_headers(
    api: TestClient, fleet: Fleet
) -> None:
    anonymous = api.get("/ui/clusters?x=1", follow_redirects=False)
    assert anonymous.status_code == 303
    assert anonymous.headers["location"] == "/ui/login?next=%2Fui%2Fclusters%3Fx%3D1"
    answer = api.post(
        "/ui/login", data={"token": admin_token(fleet), "next": "https://elsewhere/x"},
        follow_redirects=False,
    )  # fmt: skip
    assert answer.headers["location"] == "/ui/machines", "never off the UI after a login"
    cookie = answer.headers["set-cookie"]
    for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/ui"):
        assert flag in cookie
    page = api.get("/ui/machines")
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    assert page.headers["cache-control"] == "no-store"
    # The cookie is only for /ui/: the REST API still wants a token.
    assert api.get("/v1/machines").status_code == 401


def test_changes_need_the_sessions_csrf_token_and_a_refusal_changes_nothing(
    api: TestClient, fleet: Fleet
) -> None:
    csrf = login(api, fleet)
    form = {"ttl": "1h", "uses": "2", "labels": ""}
    refused = api.post("/ui/join-tokens", data=form)
    assert refused.status_code == 403 and "CSRF" in refused.text
    refused = api.post("/ui/join-tokens", data={**form, "csrf": "stale"})
    assert refused.status_code == 403
    with fleet.database.session() as session:
        assert service.join_tokens(session) == []
    assert api.post("/ui/join-tokens", data={**form, "csrf": csrf}).status_code == 201
    assert api.post("/ui/join-tokens", data=form, headers={"X-CSRF-Token": csrf}).status_code == 201
    # An API token is not ambient: a script with one needs no CSRF token.
    bearer = TestClient(api.app, base_url="https://testserver")
    made = bearer.post(
        "/ui/join-tokens", data=form, headers={"Authorization": f"Bearer {admin_token(fleet)}"}
    )
    assert made.status_code == 201
    # Bad input: the field is named, nothing is made.
    bad = api.post("/ui/join-tokens", data={**form, "uses": "lots", "csrf": csrf})
    assert bad.status_code == 400 and re.search(r'id="e-uses"[^>]*>uses: ', bad.text)
    with fleet.database.session() as session:
        assert len(service.join_tokens(session)) == 3


def test_logout_ends_the_session_for_good(api: TestClient, fleet: Fleet) -> None:
    csrf = login(api, fleet)
    cookie = api.cookies.get(web.SESSION_COOKIE)
    assert cookie
    assert api.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    again = TestClient(api.app, base_url="https://testserver", cookies={web.SESSION_COOKIE: cookie})
    answer = again.get("/ui/machines", follow_redirects=False)
    assert answer.status_code == 303 and "reason=the+session+ended" in answer.headers[
        "location"
    ].replace("%20", "+")


def test_failed_logins_from_one_address_are_slowed_down(api: TestClient, fleet: Fleet) -> None:
    for _ in range(10):
        answer = api.post("/ui/login", data={"name": "admin", "password": "not it at all"})
        assert answer.status_code == 401
    answer = api.post("/ui/login", data={"token": admin_token(fleet)}, follow_redirects=False)
    assert answer.status_code == 429 and "too many failed logins" in answer.text
    other = api.post(
        "/ui/login", data={"token": admin_token(fleet)},
        headers={"Origin": "https://evil.example"}, follow_redirects=False,
    )  # fmt: skip
    assert other.status_code in (403, 429)


def test_static_assets_are_versioned_cached_and_only_from_the_package(api: TestClient) -> None:
    css = api.get(web.asset("basalt.css"))
    assert css.status_code == 200 and "immutable" in css.headers["cache-control"]
    assert css.headers["content-type"].startswith("text/css")
    assert api.get("/ui/static/vendor/htmx-2.0.11.min.js").status_code == 200
    for path in ("../rest.py", "..%2Fweb.py", "templates/base.html", "basalt.py", "nope.css"):
        answer = api.get(f"/ui/static/{path}", follow_redirects=False)
        assert answer.status_code in (303, 404), path  # (a client may fold "..": no route)
        assert "from __future__" not in answer.text and "{% block" not in answer.text


def test_a_live_stream_sends_the_table_first_then_only_changed_rows(
    api: TestClient, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web, "LIVE_LIFETIME", 1.0)
    uids = add_machines(fleet, 4)
    login(api, fleet)
    body = api.get("/ui/machines/live").text
    events = [e for e in body.split("\n\n") if e.startswith("event: swap")]
    assert len(events) == 1, "nothing changed after the first look"
    assert 'id="machines-table"' in events[0] and f'id="m-{uids[0]}"' in events[0]
    # Every SSE data line is prefixed: the HTML arrives whole.
    assert all(line.startswith(("event:", "data:")) for line in events[0].splitlines())


def test_every_page_renders_for_an_admin_and_a_reader(api: TestClient, fleet: Fleet) -> None:
    uids = add_machines(fleet, 3)
    login(api, fleet)
    pages = ["/ui/machines", f"/ui/machines/{uids[0]}", f"/ui/machines/{uids[1]}/stats",
             "/ui/clusters", "/ui/rollouts", "/ui/releases", "/ui/join-tokens", "/ui/users",
             "/ui/audit", "/ui/audit?action=ui.&before=5"]  # fmt: skip
    for path in pages:
        answer = api.get(path)
        assert answer.status_code == 200, (path, answer.text[-500:])
        assert "<html" in answer.text or path.endswith("/stats")
    # A reader: the same pages but the operator's and admin's refuse, by name.
    with fleet.database.session() as session:
        _, token = service.create_user(session, ADMIN, "rita", "fleet:reader", Scope())
    reader = TestClient(api.app, base_url="https://testserver")
    reader.post("/ui/login", data={"token": token}, follow_redirects=False)
    for path in pages:
        answer = reader.get(path)
        if path.startswith(("/ui/join-tokens", "/ui/users", "/ui/audit")):
            assert answer.status_code == 403 and "rita is fleet:reader" in answer.text, path
        else:
            assert answer.status_code == 200, path
            assert "data-select-all" not in answer.text and "Apply to ticked" not in answer.text


def test_an_operator_limited_to_a_cluster_cannot_relabel_machines_of_another(
    api: TestClient, fleet: Fleet
) -> None:
    uids = add_machines(fleet, 4)  # uids[0] and uids[3] are in cluster "edge"
    with fleet.database.session() as session:
        _, token = service.create_user(session, ADMIN, "olga", "fleet:operator", Scope(("lab",)))
    olga = {"Authorization": f"Bearer {token}"}
    form = {"machine": [uids[1], uids[0]], "set": "owner=olga"}
    refused = api.post("/ui/machines/labels", data=form, headers=olga)
    assert refused.status_code == 403 and "may not act on cluster edge" in refused.text
    patch = api.patch(f"/v1/machines/{uids[0]}/labels", json={"set": {"a": "b"}}, headers=olga)
    assert patch.status_code == 403
    with fleet.database.session() as session:  # all or none: the free machine is untouched
        assert all("owner" not in m.labels for m in session.query(Machine).all())
    done = api.post("/ui/machines/labels", data={"machine": [uids[1]], "set": "owner=olga"},
                    headers=olga)  # fmt: skip
    assert done.status_code == 200 and "labels changed on 1 machines" in done.text


def test_join_tokens_and_users_from_the_ui(api: TestClient, fleet: Fleet) -> None:
    csrf = {"X-CSRF-Token": login(api, fleet)}
    made = api.post("/ui/join-tokens", data={"ttl": "never", "uses": "3", "labels": "zone=a"},
                    headers=csrf)  # fmt: skip
    assert made.status_code == 201
    url = re.search(r'id="new-token-url">([^<]+)<', made.text)
    assert url is not None and "token=bfj_" in url[1]
    with fleet.database.session() as session:
        (token,) = service.join_tokens(session)
    assert token["expires"] is None and token["labels"] == {"zone": "a"}
    listed = api.get("/ui/join-tokens")
    assert "token=bfj_" not in listed.text, "a join token is shown once"
    revoked = api.post(f"/ui/join-tokens/{token['id']}/revoke", headers=csrf)
    assert revoked.status_code == 200 and "revoked" in revoked.text
    with fleet.database.session() as session:
        assert service.join_tokens(session)[0]["revoked"] is True
    # Users: a bad role and a short password are named; nothing is made.
    short = {"name": "vic", "role": "fleet:reader", "password": "short"}
    for form, field in (({"name": "vic", "role": "fleet:god"}, "role"), (short, "password")):
        bad = api.post("/ui/users", data=form, headers=csrf)
        assert bad.status_code == 400 and re.search(rf'id="e-{field}"[^>]*>{field}: ', bad.text)
    with fleet.database.session() as session:
        assert [u["name"] for u in service.users(session)] == ["admin"]
    made = api.post("/ui/users", data={"name": "vic", "role": "fleet:operator"}, headers=csrf)
    assert made.status_code == 201 and "bft_" in made.text
    assert api.post("/ui/users/vic/password", data={"password": "a long passphrase here"},
                    headers=csrf).status_code == 200  # fmt: skip
    with fleet.database.session() as session:
        assert logins.check_login(session, "vic", "a long passphrase here").role == "fleet:operator"
