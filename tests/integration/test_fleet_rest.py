"""Basalt Fleet's REST API and its database, against SQLite and a real PostgreSQL.

Every test runs twice: on the embedded SQLite and on a PostgreSQL cluster this module
starts (tests/fakes/postgres.py). The app is served in-process (FastAPI's test client);
enrolment uses real CSRs and the fleet's real CA.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy import text

from basalt.fleet import audit
from basalt.fleet.auth import FleetRole
from basalt.fleet.core import Fleet, FleetOptions
from basalt.fleet.db import AuditEntry
from basalt.fleet.migrations import current, upgrade
from basalt.fleet.rest import PUBLIC, ROUTE_ROLES, make_app
from basalt.machinery.fleetlink.url import ca_fingerprint, parse_fleet_url
from basalt.machinery.pki import generate_private_key
from tests.fakes.postgres import PostgresServer, remove_postgres, start_postgres

pytestmark = pytest.mark.integration

ROLES = ("fleet:reboot", "fleet:reader", "fleet:operator", "fleet:admin")


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = start_postgres("127.0.0.61")
    yield server
    remove_postgres(server)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
def fleet(tmp_path: Path, database_url: str) -> Iterator[Fleet]:
    made = Fleet(FleetOptions(data_dir=tmp_path / "fleet", database=database_url, port=18443))
    yield made
    made.close()


@pytest.fixture
def api(fleet: Fleet) -> TestClient:
    return TestClient(make_app(fleet))


def admin_headers(fleet: Fleet) -> dict[str, str]:
    return {"Authorization": f"Bearer {fleet.admin_token_path.read_text().strip()}"}


def user_headers(api: TestClient, fleet: Fleet, role: str, name: str = "") -> dict[str, str]:
    name = name or role.replace(":", "-")
    made = api.post("/v1/users", json={"name": name, "role": role}, headers=admin_headers(fleet))
    assert made.status_code == 201, made.text
    return {"Authorization": f"Bearer {made.json()['token']}"}


def csr_for(machine_uuid: str) -> str:
    key = generate_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def join_token(api: TestClient, fleet: Fleet, **body: Any) -> dict[str, Any]:
    made = api.post("/v1/join-tokens", json=body, headers=admin_headers(fleet))
    assert made.status_code == 201, made.text
    return dict(made.json())


def enrol(api: TestClient, token: str, machine_uuid: str | None = None) -> Any:
    body = {"token": token, "machine_uuid": machine_uuid or str(uuid.uuid4()), "csr": ""}
    body["csr"] = csr_for(body["machine_uuid"])
    return api.post("/v1/enrol", json=body)


# -- the database -------------------------------------------------------------------------------


def test_migrations_give_the_models_and_upgrade_from_the_previous_one(fleet: Fleet) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from basalt.fleet.db import Base

    engine = fleet.database.engine
    assert current(engine) == "0005"
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    # Down to nothing and back: the history replays on a database that had it.
    from alembic import command

    from basalt.fleet.migrations import _config

    with engine.begin() as connection:
        command.downgrade(_config(connection), "base")  # type: ignore[arg-type]
    assert current(engine) is None
    # From the previous migration to the newest, with data in the old schema.
    upgrade(engine, "0001")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO machines (uuid, state, hostname, labels, inventory, cert_serial, "
                "join_token, enrolled, replica) VALUES ('m1', 'free', 'h', '{}', '{}', 'ab', "
                "'t', '2026-01-01 00:00:00', '')"
            )
        )
    upgrade(engine)
    assert current(engine) == "0005"
    with engine.connect() as connection:
        row = connection.execute(text("SELECT role, machine_set FROM machines")).one()
    assert tuple(row) == ("", "")


def test_secrets_are_sealed_at_rest(fleet: Fleet) -> None:
    """The CA key in the database is ciphertext; the secrets key (a file) opens it."""
    with fleet.database.engine.connect() as connection:
        rows = {r[0]: r[1] for r in connection.execute(text("SELECT name, value FROM settings"))}
    assert b"PRIVATE KEY" not in bytes(rows["ca.key"])
    assert fleet.ca.key is not None and "PRIVATE KEY" in fleet.ca.key
    # Another secrets key on the same database: refused by name, not as corrupt data.
    from basalt.fleet.secretbox import SecretsKeyError

    with pytest.raises(SecretsKeyError, match="another secrets key") as refused:
        Fleet(
            FleetOptions(
                data_dir=fleet.options.data_dir.parent / "other",
                database=fleet.options.database_url,
                port=18443,
            )
        )
    assert "--secrets-key" in (refused.value.hint or "")


# -- roles --------------------------------------------------------------------------------------


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda m: {"{uuid}": str(uuid.UUID(int=1))}.get(m[0], "x"), path)


def test_every_route_has_a_role_and_the_matrix_holds(
    api: TestClient, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every route of the REST API and of the web UI, with each role: the web UI's
    pages send a browser without a session to the login page instead of a bare 401."""
    from fastapi.routing import APIRoute

    from basalt.fleet.ui import web

    monkeypatch.setattr(web, "LIVE_LIFETIME", 0.0)  # live streams answer and end
    declared = {(m, r.path) for r in api.app.routes if isinstance(r, APIRoute) for m in r.methods}
    assert declared == set(ROUTE_ROLES), "every route is declared with route(..., role)"
    assert any(path.startswith("/ui/") for _m, path in declared)
    headers = {role: user_headers(api, fleet, role) for role in ROLES}
    for (method, path), needed in sorted(ROUTE_ROLES.items()):
        url = _concrete(path)
        ui = path.startswith("/ui/")
        anonymous = api.request(method, url, json={}, follow_redirects=False)
        if needed == PUBLIC:
            assert anonymous.status_code not in (401, 403), (method, path)
            continue
        if ui and method == "GET":
            assert anonymous.status_code == 303, (method, path, anonymous.text)
            assert anonymous.headers["location"].startswith("/ui/login?next=")
        else:
            assert anonymous.status_code == 401, (method, path, anonymous.text)
        bogus = api.request(method, url, json={}, headers={"Authorization": "Bearer bft_nope"})
        assert bogus.status_code == 401, (method, path)
        for role in ROLES:
            answer = api.request(
                method, url, json={}, headers=headers[role], follow_redirects=False
            )
            if not FleetRole(role).allows(FleetRole(str(needed))):
                assert answer.status_code == 403, (method, path, role, answer.text)
                assert needed in (answer.text if ui else answer.json()["detail"])
            else:
                assert answer.status_code not in (401, 403), (method, path, role, answer.text)


#: The image factory in the fleet (docs/factory.md): readers read, operators post, and
#: the browser's copies of the reads; a join token's installation image is an operator's.
FACTORY_ROLES = {
    ("GET", "/factory/"): FleetRole.READER,
    ("GET", "/factory/factory.css"): FleetRole.READER,
    ("GET", "/factory/schematics"): FleetRole.READER,
    ("GET", "/factory/schematics/{schematic_id}"): FleetRole.READER,
    ("GET", "/factory/builds/{schematic_id}/{version}"): FleetRole.READER,
    ("GET", "/factory/image/{schematic_id}/{version}/{name}"): FleetRole.READER,
    ("GET", "/factory/extensions"): FleetRole.READER,
    ("POST", "/factory/schematics"): FleetRole.OPERATOR,
    ("POST", "/factory/builds/{schematic_id}/{version}"): FleetRole.OPERATOR,
    ("POST", "/factory/extensions"): FleetRole.OPERATOR,
    ("GET", "/ui/factory/"): FleetRole.READER,
    ("GET", "/ui/factory/factory.css"): FleetRole.READER,
    ("GET", "/ui/factory/schematics"): FleetRole.READER,
    ("GET", "/ui/factory/schematics/{schematic_id}"): FleetRole.READER,
    ("GET", "/ui/factory/builds/{schematic_id}/{version}"): FleetRole.READER,
    ("GET", "/ui/factory/image/{schematic_id}/{version}/{name}"): FleetRole.READER,
    ("GET", "/ui/factory/extensions"): FleetRole.READER,
    ("POST", "/v1/join-tokens/{token_id}/image"): FleetRole.OPERATOR,
    ("POST", "/ui/join-tokens/{token_id}/image"): FleetRole.OPERATOR,
    ("GET", "/ui/join-tokens/image/{schematic_id}"): FleetRole.OPERATOR,
}


def test_the_factory_routes_have_their_roles(api: TestClient) -> None:
    """Rows of the matrix above for the factory: pinned, so a change of role is a
    deliberate edit here and in docs/factory.md. (A secret schematic's image also needs
    fleet:operator: tests/unit/test_factory.py.)"""
    found = {key: ROUTE_ROLES.get(key) for key in FACTORY_ROLES}
    assert found == FACTORY_ROLES
    assert {k for k in ROUTE_ROLES if "/factory" in k[1]} <= set(FACTORY_ROLES)


def test_a_refused_role_changes_nothing(api: TestClient, fleet: Fleet) -> None:
    reader = user_headers(api, fleet, "fleet:reader")
    before = api.get("/v1/audit", headers=admin_headers(fleet)).json()
    refused = api.post("/v1/join-tokens", json={"uses": 1}, headers=reader)
    assert refused.status_code == 403
    assert api.get("/v1/join-tokens", headers=admin_headers(fleet)).json() == []
    assert api.get("/v1/audit", headers=admin_headers(fleet)).json() == before


# -- join tokens and enrolment ------------------------------------------------------------------


def test_join_token_url_pins_the_ca_and_uses_run_out(api: TestClient, fleet: Fleet) -> None:
    made = join_token(api, fleet, uses=2, labels={"rack": "r1"})
    url = parse_fleet_url(made["url"])
    assert url.ca_sha256 == ca_fingerprint(api.get("/v1/ca").text)
    assert url.token == made["token"]
    first, second = enrol(api, made["token"]), enrol(api, made["token"])
    assert first.status_code == second.status_code == 200
    cert = x509.load_pem_x509_certificate(first.json()["certificate"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value != "ignored"
    third = enrol(api, made["token"])
    assert third.status_code == 403
    assert "used up" in third.json()["detail"]
    machines = api.get("/v1/machines", headers=admin_headers(fleet)).json()
    assert len(machines) == 2
    assert all(m["labels"] == {"rack": "r1"} and m["state"] == "free" for m in machines)
    tokens = api.get("/v1/join-tokens", headers=admin_headers(fleet)).json()
    assert tokens[0]["used"] == 2 and "token" not in tokens[0]


def test_expired_revoked_and_unknown_tokens_are_refused(api: TestClient, fleet: Fleet) -> None:
    revoked = join_token(api, fleet, uses=5)
    assert (
        api.delete(f"/v1/join-tokens/{revoked['id']}", headers=admin_headers(fleet)).status_code
        == 204
    )
    answer = enrol(api, revoked["token"])
    assert answer.status_code == 403 and "revoked" in answer.json()["detail"]
    short = join_token(api, fleet, uses=5, ttl=1)
    from sqlalchemy import update

    from basalt.fleet.db import JoinToken

    with fleet.database.session() as session:
        session.execute(
            update(JoinToken)
            .where(JoinToken.id == short["id"])
            .values(expires=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    answer = enrol(api, short["token"])
    assert answer.status_code == 403 and "expired" in answer.json()["detail"]
    answer = enrol(api, "bfj_0000.nope")
    assert answer.status_code == 403 and "not known" in answer.json()["detail"]
    assert api.get("/v1/machines", headers=admin_headers(fleet)).json() == []


def test_a_removed_machine_cannot_enrol_again_until_readmitted(
    api: TestClient, fleet: Fleet
) -> None:
    made = join_token(api, fleet, uses=5)
    machine = str(uuid.uuid4())
    assert enrol(api, made["token"], machine).status_code == 200
    removed = api.delete(f"/v1/machines/{machine}", headers=admin_headers(fleet))
    assert removed.json()["state"] == "removed"
    again = enrol(api, made["token"], machine)
    assert again.status_code == 403 and "removed" in again.json()["detail"]
    assert "readmit" in again.json()["hint"]
    api.post(f"/v1/machines/{machine}/readmit", headers=admin_headers(fleet))
    assert enrol(api, made["token"], machine).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"uses": 0}, "uses"),
        ({"uses": 1, "ttl": -5}, "ttl"),
        ({"uses": 1, "labels": {"bad key!": "x"}}, "label key"),
        ({"uses": 1, "labels": {"k": "not valid!"}}, "labels.k"),
        ({"uses": "many"}, "uses"),
        ({"uses": 1, "colour": "red"}, "colour"),
    ],
)
def test_bad_join_token_requests_name_the_field(
    api: TestClient, fleet: Fleet, body: dict[str, Any], field: str
) -> None:
    answer = api.post("/v1/join-tokens", json=body, headers=admin_headers(fleet))
    assert answer.status_code in (400, 422)
    assert field in answer.text
    assert api.get("/v1/join-tokens", headers=admin_headers(fleet)).json() == []


def test_bad_enrolment_input_is_refused(api: TestClient, fleet: Fleet) -> None:
    made = join_token(api, fleet, uses=5)
    body = {"token": made["token"], "machine_uuid": "not-a-uuid", "csr": csr_for("x")}
    answer = api.post("/v1/enrol", json=body)
    assert answer.status_code == 400 and "machine_uuid" in answer.json()["detail"]
    body = {"token": made["token"], "machine_uuid": str(uuid.uuid4()), "csr": "garbage"}
    answer = api.post("/v1/enrol", json=body)
    assert answer.status_code == 400 and "csr" in answer.json()["detail"]
    tokens = api.get("/v1/join-tokens", headers=admin_headers(fleet)).json()
    assert tokens[0]["used"] == 0


# -- the audit chain ----------------------------------------------------------------------------


def test_audit_chain_verifies_and_detects_edits_and_removals(api: TestClient, fleet: Fleet) -> None:
    join_token(api, fleet, uses=1)
    join_token(api, fleet, uses=2)
    user_headers(api, fleet, "fleet:reader", "carol")
    verified = api.get("/v1/audit/verify", headers=admin_headers(fleet)).json()
    assert verified == {"intact": True, "entries": 5, "breaks": []}
    entries = api.get("/v1/audit", headers=admin_headers(fleet)).json()
    assert [e["action"] for e in entries] == [
        "user.create",
        "join-token.create",
        "join-token.create",
        "token.create",
        "user.create",
    ]
    with fleet.database.engine.begin() as connection:
        connection.execute(text("UPDATE audit SET actor = 'mallory' WHERE id = 2"))
    broken = api.get("/v1/audit/verify", headers=admin_headers(fleet)).json()
    assert not broken["intact"]
    assert broken["breaks"] == [{"entry": 2, "reason": "its content does not match its digest "
                                                       "(edited)"}]  # fmt: skip
    with fleet.database.engine.begin() as connection:
        connection.execute(text("UPDATE audit SET actor = 'admin' WHERE id = 2"))
        connection.execute(text("DELETE FROM audit WHERE id = 3"))
    broken = api.get("/v1/audit/verify", headers=admin_headers(fleet)).json()
    assert [b["entry"] for b in broken["breaks"]] == [4, 4]
    assert "missing" in broken["breaks"][0]["reason"]


def test_audit_verify_function_on_a_clean_chain(fleet: Fleet) -> None:
    with fleet.database.session() as session:
        for n in range(5):
            audit.record(session, "t", "test", str(n), {"n": n, "nested": {"b": 1, "a": [1]}})
    with fleet.database.session() as session:
        from sqlalchemy import select

        rows = list(session.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars())
        assert audit.verify(rows) == []
        assert rows[-1].previous == rows[-2].digest


# -- metrics and the OpenAPI document -----------------------------------------------------------


def test_metrics_and_openapi(api: TestClient, fleet: Fleet) -> None:
    made = join_token(api, fleet, uses=3)
    enrol(api, made["token"])
    metrics = api.get("/metrics", headers=admin_headers(fleet)).text
    assert 'basalt_fleet_machines{state="free"} 1.0' in metrics
    assert "basalt_fleet_http_request_seconds" in metrics
    document = api.get("/openapi.json", headers=admin_headers(fleet)).json()
    assert "/v1/machines" in document["paths"]
    assert api.get("/openapi.json").status_code == 401


# -- scopes -------------------------------------------------------------------------------------

SCOPED_TEMPLATE = """\
apiVersion: fleet.basalt.dev/v1alpha1
kind: Cluster
name: {name}
labels: {{team: {team}}}
controlPlane: {{count: 1}}
"""


def test_users_limited_to_clusters_by_name_or_label(api: TestClient, fleet: Fleet) -> None:
    def operator(name: str, **scope: Any) -> dict[str, str]:
        body = {"name": name, "role": "fleet:operator", **scope}
        made = api.post("/v1/users", json=body, headers=admin_headers(fleet))
        assert made.status_code == 201, made.text
        return {"Authorization": f"Bearer {made.json()['token']}"}

    by_name = operator("alpha-only", clusters=["alpha"])
    by_label = operator("team-x", labels={"team": "x"})

    def apply(headers: dict[str, str], name: str, team: str) -> Any:
        body = {"template": SCOPED_TEMPLATE.format(name=name, team=team)}
        return api.post("/v1/clusters?dry_run=true", json=body, headers=headers)

    # In scope: the plan runs (and is refused for want of machines, naming the selector).
    inside = apply(by_name, "alpha", "y")
    assert inside.status_code == 400 and "controlPlane.machineSelector" in inside.text
    assert apply(by_label, "beta", "x").status_code == 400
    # Out of scope: refused before anything is planned.
    outside = apply(by_name, "beta", "x")
    assert outside.status_code == 403 and "alpha-only may not act on cluster beta" in outside.text
    assert apply(by_label, "gamma", "y").status_code == 403
    assert api.get("/v1/clusters/beta", headers=by_name).status_code == 403


# -- FleetLock ----------------------------------------------------------------------------------

FLEETLOCK = {"fleet-lock-protocol": "true"}


def test_fleetlock_slots_per_group(api: TestClient, fleet: Fleet) -> None:
    import base64

    reboot = user_headers(api, fleet, "fleet:reboot", "updater")
    token = reboot["Authorization"].removeprefix("Bearer ")
    # A FleetLock client puts the token in its URL: basic auth, the token as password.
    basic = {"Authorization": "Basic " + base64.b64encode(f"x:{token}".encode()).decode()}

    def call(path: str, node: str, group: str = "workers", auth: dict[str, str] = reboot) -> Any:
        body = {"client_params": {"id": node, "group": group}}
        return api.post(path, json=body, headers={**auth, **FLEETLOCK})

    assert call("/v1/pre-reboot", "node-a").status_code == 200
    assert call("/v1/pre-reboot", "node-a").status_code == 200  # idempotent
    busy = call("/v1/pre-reboot", "node-b", auth=basic)
    assert busy.status_code == 409
    assert busy.json()["kind"] == "failed_lock" and "held (by node-a)" in busy.json()["value"]
    assert call("/v1/pre-reboot", "node-c", group="other").status_code == 200
    assert call("/v1/steady-state", "node-a").status_code == 200
    assert call("/v1/steady-state", "node-a").status_code == 200  # idempotent
    assert call("/v1/pre-reboot", "node-b", auth=basic).status_code == 200
    # An operator gives a group more slots.
    widen = api.put("/v1/reboot-groups/workers", json={"slots": 2}, headers=admin_headers(fleet))
    assert widen.status_code == 200
    assert call("/v1/pre-reboot", "node-d").status_code == 200
    groups = api.get("/v1/reboot-groups", headers=admin_headers(fleet)).json()
    assert {"group": "workers", "slots": 2, "holders": ["node-b", "node-d"]} in groups
    # The protocol header is required; a reboot token reads nothing else.
    plain = api.post(
        "/v1/pre-reboot", json={"client_params": {"id": "n", "group": "g"}}, headers=reboot
    )
    assert plain.status_code == 400 and "fleet-lock-protocol" in plain.text
    assert api.get("/v1/machines", headers=reboot).status_code == 403
    bad = call("/v1/pre-reboot", "n", group="no spaces allowed")
    assert bad.status_code == 400 and "client_params.group" in bad.text
    actions = [e["action"] for e in api.get("/v1/audit", headers=admin_headers(fleet)).json()]
    assert actions.count("reboot.take") == 4 and actions.count("reboot.release") == 1


# -- releases, promotion, rollouts --------------------------------------------------------------


@pytest.fixture
def releasing(tmp_path: Path, database_url: str) -> Iterator[tuple[Fleet, TestClient]]:
    from basalt.machinery.images import create_bundle, generate_signing_key, load_signing_key
    from basalt.machinery.releases.repository import Repository

    repo = Repository.init(tmp_path / "repo")
    key = load_signing_key(generate_signing_key()[0])
    for name in ("kernel", "initramfs", "rootfs.squashfs"):
        (tmp_path / name).write_bytes(name.encode() * 10)
    files = {n: tmp_path / n for n in ("kernel", "initramfs", "rootfs.squashfs")}
    create_bundle(tmp_path / "b.tar", files, "0.2.0", "default", "x86_64", key)
    repo.publish(tmp_path / "b.tar", "0.2.0", "x86_64", "beta")
    made = Fleet(
        FleetOptions(
            data_dir=tmp_path / "fleet", database=database_url, port=18443,
            releases=repo.directory, promote_min_machines=2, promote_min_seconds=3600,
        )
    )  # fmt: skip
    yield made, TestClient(make_app(made))
    made.close()


def test_the_repository_is_served_without_its_keys(
    releasing: tuple[Fleet, TestClient],
) -> None:
    fleet, api = releasing
    assert api.get("/releases/metadata/1.root.json").json()["signed"]["_type"] == "root"
    assert api.get("/releases/targets/beta/basalt-0.2.0-x86_64.tar").status_code == 200
    for path in ("keys/root.pem", "keys/beta.pem", "metadata/../keys/root.pem", "../fleet.db"):
        answer = api.get(f"/releases/{path}")
        assert answer.status_code in (401, 404) and "PRIVATE" not in answer.text, path
    listed = api.get("/v1/releases", headers=admin_headers(fleet)).json()
    assert [(r["channel"], r["version"], r["yanked"]) for r in listed] == [("beta", "0.2.0", False)]


def test_promotion_needs_evidence_or_an_audited_force_by_an_admin(
    releasing: tuple[Fleet, TestClient],
) -> None:
    fleet, api = releasing
    body = {"version": "0.2.0", "from": "beta", "to": "stable"}
    operator = user_headers(api, fleet, "fleet:operator")
    refused = api.post("/v1/releases/promote", json=body, headers=operator)
    assert refused.status_code == 409
    assert "0 machine(s) ran it healthy, the rule wants 2" in refused.json()["detail"]
    forced = api.post("/v1/releases/promote", json={**body, "force": True}, headers=operator)
    assert forced.status_code == 403 and "--force needs fleet:admin" in forced.json()["detail"]
    listed = api.get("/v1/releases", headers=operator).json()
    assert [r["channel"] for r in listed] == ["beta"]  # nothing changed
    done = api.post("/v1/releases/promote", json={**body, "force": True},
                    headers=admin_headers(fleet))  # fmt: skip
    assert done.status_code == 200 and done.json()["forced"] is True
    entries = api.get("/v1/audit", headers=admin_headers(fleet)).json()
    [promoted] = [e for e in entries if e["action"] == "release.promote"]
    assert promoted["target"] == "stable/0.2.0" and promoted["detail"]["forced"] is True


def test_a_bad_rollout_is_refused_by_field_and_changes_nothing(
    releasing: tuple[Fleet, TestClient],
) -> None:
    fleet, api = releasing
    operator = user_headers(api, fleet, "fleet:operator")

    def start(**body: Any) -> Any:
        return api.post("/v1/rollouts", json={"version": "0.2.0", "channel": "beta", **body},
                        headers=operator)  # fmt: skip

    cases = [
        ({"policy": {"waves": [10, 50]}}, "policy.waves: the last wave must be 100"),
        ({"policy": {"soak": "a while"}}, "policy.soak: 'a while' is not a duration"),
        ({"policy": {"windows": [{"cron": "0 2 * *", "duration": "1h"}]}}, "4 fields"),
        ({"policy": {"maxFailures": -1}}, "policy.maxFailures"),
        ({"version": "9.9.9"}, "9.9.9 is not in channel beta"),
        ({}, "no cluster follows channel beta"),
        ({"clusters": ["nope"]}, "no cluster 'nope'"),
    ]
    for body, message in cases:
        answer = start(**body)
        assert answer.status_code in (400, 404), (body, answer.text)
        assert message in answer.json()["detail"], (body, answer.json())
    assert api.get("/v1/rollouts", headers=operator).json() == []
    assert not any(
        e["action"].startswith("rollout.")
        for e in api.get("/v1/audit", headers=admin_headers(fleet)).json()
    )
    assert api.post("/v1/rollouts/7/pause", headers=operator).status_code == 404
    assert api.post("/v1/rollouts/7/explode", headers=operator).status_code == 404
    paused = api.put("/v1/rollout-pause", json={"paused": True}, headers=operator)
    assert paused.status_code == 200 and paused.json() == {"paused": True}
    assert api.get("/v1/rollout-pause", headers=operator).json() == {"paused": True}


# -- web UI passwords ---------------------------------------------------------------------------

SECRET = "correct horse battery staple"


def ui_login(api: TestClient, name: str, password: str) -> Any:
    """A browser's login form (the session cookie is Secure: an https client keeps it)."""
    browser = TestClient(api.app, base_url="https://testserver")
    data = {"name": name, "password": password}
    return browser.post("/ui/login", data=data, follow_redirects=False)


def test_an_admin_sets_a_password_and_the_user_logs_in_with_it(
    api: TestClient, fleet: Fleet
) -> None:
    user_headers(api, fleet, "fleet:reader", "dana")
    assert ui_login(api, "dana", SECRET).status_code == 401  # tokens only so far
    done = api.put("/v1/users/dana/password", json={"password": SECRET},
                   headers=admin_headers(fleet))  # fmt: skip
    assert done.status_code == 200 and done.json() == {"name": "dana", "password": "set"}
    login = ui_login(api, "dana", SECRET)
    assert login.status_code == 303, login.text
    assert "basalt_session" in login.cookies
    assert ui_login(api, "dana", SECRET + "!").status_code == 401
    removed = api.put("/v1/users/dana/password", json={"password": ""},
                      headers=admin_headers(fleet))  # fmt: skip
    assert removed.json() == {"name": "dana", "password": "removed"}
    assert ui_login(api, "dana", SECRET).status_code == 401
    missing = api.put("/v1/users/nobody/password", json={"password": SECRET},
                      headers=admin_headers(fleet))  # fmt: skip
    assert missing.status_code == 404 and "nobody" in missing.json()["detail"]


def test_a_bad_password_is_refused_by_field_and_changes_nothing(
    api: TestClient, fleet: Fleet
) -> None:
    user_headers(api, fleet, "fleet:reader", "erin")
    admin = admin_headers(fleet)
    set_first = api.put("/v1/users/erin/password", json={"password": SECRET}, headers=admin)
    assert set_first.status_code == 200
    before = api.get("/v1/audit", headers=admin).json()
    short = api.put("/v1/users/erin/password", json={"password": "short"}, headers=admin)
    assert short.status_code == 400
    assert short.json()["detail"].startswith("password: a password has at least 12")
    long = api.put("/v1/users/erin/password", json={"password": "x" * 1025}, headers=admin)
    assert long.status_code == 422 and long.json()["detail"][0]["loc"] == ["body", "password"]
    assert api.get("/v1/audit", headers=admin).json() == before
    assert ui_login(api, "erin", SECRET).status_code == 303  # the old one still holds


def test_users_set_their_own_password_with_the_current_one(api: TestClient, fleet: Fleet) -> None:
    frank = user_headers(api, fleet, "fleet:reader", "frank")
    assert api.get("/v1/whoami", headers=frank).json()["password"] is False
    # No password yet: none to give.
    first = api.put("/v1/whoami/password", json={"password": SECRET}, headers=frank)
    assert first.status_code == 200 and first.json() == {"name": "frank", "password": "set"}
    assert api.get("/v1/whoami", headers=frank).json()["password"] is True
    new = "a different passphrase"
    before = api.get("/v1/audit", headers=admin_headers(fleet)).json()
    for wrong, message in (
        ("", "current: give your current password to change it"),
        ("not it at all", "current: the current password is wrong"),
    ):
        refused = api.put("/v1/whoami/password", json={"password": new, "current": wrong},
                          headers=frank)  # fmt: skip
        assert refused.status_code == 403, refused.text
        assert refused.json()["detail"] == message
    short = api.put("/v1/whoami/password", json={"password": "short", "current": SECRET},
                    headers=frank)  # fmt: skip
    assert short.status_code == 400 and short.json()["detail"].startswith("password: ")
    assert api.get("/v1/audit", headers=admin_headers(fleet)).json() == before
    assert ui_login(api, "frank", SECRET).status_code == 303
    changed = api.put("/v1/whoami/password", json={"password": new, "current": SECRET},
                      headers=frank)  # fmt: skip
    assert changed.status_code == 200, changed.text
    assert ui_login(api, "frank", SECRET).status_code == 401
    assert ui_login(api, "frank", new).status_code == 303


def test_a_password_is_never_in_the_audit_log_or_a_log_line(
    api: TestClient, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    gina = user_headers(api, fleet, "fleet:reader", "gina")
    api.put("/v1/users/gina/password", json={"password": SECRET}, headers=admin_headers(fleet))
    api.put("/v1/whoami/password", json={"password": SECRET[::-1], "current": SECRET},
            headers=gina)  # fmt: skip
    api.put("/v1/whoami/password", json={"password": "", "current": SECRET[::-1]}, headers=gina)
    entries = [e for e in api.get("/v1/audit", headers=admin_headers(fleet)).json()
               if e["action"] == "user.password"]  # fmt: skip
    assert [(e["actor"], e["target"], e["detail"]) for e in entries] == [
        ("admin", "gina", {"removed": False}),
        ("gina", "gina", {"removed": False}),
        ("gina", "gina", {"removed": True}),
    ]
    with fleet.database.engine.connect() as connection:
        stored = " ".join(str(r) for r in connection.execute(text("SELECT * FROM audit")))
    assert SECRET not in stored and SECRET[::-1] not in stored
    assert SECRET not in caplog.text and SECRET[::-1] not in caplog.text
