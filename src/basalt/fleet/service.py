"""What the fleet does, as plain functions on a database session.

The REST routes and the link service call these; each checks its input, changes the
database, and writes the audit entry in the same transaction, so a refusal changes
nothing and a change is never unaudited.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from basalt.machinery.errors import BasaltError, ErrorKind
from basalt.machinery.pki import CertificateAndKey

from . import audit
from .auth import Caller, FleetRole, Scope, new_token, token_digest
from .db import ApiToken, AuditEntry, JoinToken, Machine, User, aware, utcnow
from .pki import sign_machine_csr

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62})$")
_LABEL_KEY = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class FleetError(BasaltError):
    kind = ErrorKind.INVALID_ARGUMENT


class NotFound(FleetError):
    kind = ErrorKind.NOT_FOUND


class Conflict(FleetError):
    kind = ErrorKind.ALREADY_EXISTS


class Refused(FleetError):
    kind = ErrorKind.PERMISSION_DENIED


class Unauthenticated(FleetError):
    """No valid credentials; REST answers 401."""

    kind = ErrorKind.PERMISSION_DENIED


def check_labels(labels: dict[str, str], where: str) -> dict[str, str]:
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            raise FleetError(
                f"{where}: label key {key!r} is not a valid label key",
                hint="letters, digits, '-', '_', '.', at most 63 characters, optional prefix/",
            )
        if not _LABEL_VALUE.match(value):
            raise FleetError(f"{where}.{key}: label value {value!r} is not valid")
    return dict(labels)


def parse_labels(items: Sequence[str], where: str = "--label") -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise FleetError(f"{where} {item!r}: expected key=value")
        labels[key] = value
    return check_labels(labels, where)


# -- users and API tokens ----------------------------------------------------------------------
def bootstrap_admin(session: Session) -> str | None:
    """On an empty fleet: the first admin, ``admin``, and their token (else None)."""
    if session.execute(select(User.id).limit(1)).first() is not None:
        return None
    user = User(name="admin", role=FleetRole.ADMIN.value, scope={})
    session.add(user)
    session.flush()
    token = new_token("bft")
    session.add(ApiToken(user_id=user.id, digest=token_digest(token), description="bootstrap"))
    audit.record(session, "fleet", "user.create", "admin", {"role": user.role})
    return token


def authenticate(session: Session, token: str) -> Caller:
    row = session.execute(
        select(ApiToken, User)
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.digest == token_digest(token))
    ).first()
    if row is None:
        raise Unauthenticated("the API token is not known to this fleet")
    api_token, user = row
    if api_token.revoked:
        raise Unauthenticated("the API token was revoked")
    expires = aware(api_token.expires)
    if expires is not None and expires < utcnow():
        raise Unauthenticated("the API token expired")
    return Caller(user.name, FleetRole(user.role), Scope.from_json(user.scope))


def create_user(
    session: Session, caller: Caller, name: str, role: str, scope: Scope
) -> tuple[User, str]:
    if not _NAME.match(name):
        raise FleetError(f"name: {name!r} is not a valid user name (a-z, 0-9, '.', '_', '-')")
    try:
        fleet_role = FleetRole(role)
    except ValueError:
        known = ", ".join(r.value for r in FleetRole)
        raise FleetError(f"role: {role!r} is not a fleet role ({known})") from None
    if session.execute(select(User.id).where(User.name == name)).first() is not None:
        raise Conflict(f"user {name!r} exists already")
    user = User(name=name, role=fleet_role.value, scope=scope.to_json())
    session.add(user)
    session.flush()
    token = issue_api_token(session, caller, user, "created with the user")
    audit.record(session, caller.name, "user.create", name, {"role": role, **scope.to_json()})
    return user, token


def issue_api_token(session: Session, caller: Caller, user: User, description: str) -> str:
    token = new_token("bft")
    session.add(ApiToken(user_id=user.id, digest=token_digest(token), description=description))
    audit.record(session, caller.name, "token.create", user.name, {"description": description})
    return token


def user_token(session: Session, caller: Caller, name: str, description: str) -> str:
    user = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
    if user is None:
        raise NotFound(f"user {name!r} does not exist")
    return issue_api_token(session, caller, user, description)


def users(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(select(User).order_by(User.name)).scalars()
    return [{"name": u.name, "role": u.role, "scope": u.scope} for u in rows]


# -- join tokens ----------------------------------------------------------------------------
MAX_TTL = dt.timedelta(days=366)


def create_join_token(
    session: Session,
    caller: Caller,
    *,
    ttl: dt.timedelta | None,
    uses: int,
    labels: dict[str, str],
) -> tuple[JoinToken, str]:
    if uses < 1 or uses > 100_000:
        raise FleetError(f"uses: {uses} is not between 1 and 100000")
    if ttl is not None and (ttl <= dt.timedelta(0) or ttl > MAX_TTL):
        raise FleetError("ttl: must be positive and at most 366 days")
    check_labels(labels, "labels")
    public = secrets.token_hex(4)
    token = f"bfj_{public}.{secrets.token_urlsafe(24)}"
    row = JoinToken(
        id=public,
        digest=token_digest(token),
        labels=labels,
        uses=uses,
        used=0,
        expires=utcnow() + ttl if ttl is not None else None,
        created_by=caller.name,
    )
    session.add(row)
    audit.record(
        session,
        caller.name,
        "join-token.create",
        public,
        {"uses": uses, "labels": labels, "ttl": ttl.total_seconds() if ttl else None},
    )
    return row, token


def join_token_info(row: JoinToken) -> dict[str, Any]:
    expires = aware(row.expires)
    return {
        "id": row.id,
        "labels": row.labels,
        "uses": row.uses,
        "used": row.used,
        "expires": expires.isoformat() if expires else None,
        "revoked": row.revoked,
        "created_by": row.created_by,
    }


def join_tokens(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(select(JoinToken).order_by(JoinToken.created)).scalars()
    return [join_token_info(r) for r in rows]


def revoke_join_token(session: Session, caller: Caller, token_id: str) -> None:
    row = session.get(JoinToken, token_id)
    if row is None:
        raise NotFound(f"join token {token_id!r} does not exist")
    row.revoked = True
    audit.record(session, caller.name, "join-token.revoke", token_id)


# -- enrolment ------------------------------------------------------------------------------
def enrol(
    session: Session,
    ca: CertificateAndKey,
    *,
    token: str,
    machine_uuid: str,
    hostname: str,
    csr: str,
) -> str:
    """Use the join token once; returns the machine's link certificate (PEM)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    uuid = machine_uuid.lower()
    if not _UUID.match(uuid):
        raise FleetError(f"machine_uuid: {machine_uuid!r} is not a UUID")
    row = session.execute(
        select(JoinToken).where(JoinToken.digest == token_digest(token)).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        raise Refused("the join token is not known to this fleet")
    expires = aware(row.expires)
    if row.revoked:
        raise Refused(f"join token {row.id} was revoked")
    if expires is not None and expires < utcnow():
        raise Refused(f"join token {row.id} expired at {expires.isoformat()}")
    existing = session.get(Machine, uuid)
    if existing is not None and existing.state == "removed":
        raise Refused(
            f"machine {uuid} was removed from this fleet",
            hint="an admin can let it in again with 'basaltctl fleet machines readmit UUID'",
        )
    if existing is not None and existing.join_token == row.id:
        # The same token again (the machine lost its answer): a new certificate, no use.
        pass
    elif row.used >= row.uses:
        raise Refused(f"join token {row.id} is used up ({row.uses} of {row.uses} uses)")
    else:
        row.used += 1
    cert = sign_machine_csr(ca, csr, uuid)
    serial = format(cert.serial_number, "x")
    if existing is None:
        existing = Machine(
            uuid=uuid,
            state="free",
            hostname=hostname[:253],
            labels=dict(row.labels),
            inventory={},
            cert_serial=serial,
            join_token=row.id,
            replica="",
        )
        session.add(existing)
    else:
        existing.cert_serial = serial
        existing.join_token = row.id
        existing.labels = {**existing.labels, **row.labels}
    audit.record(session, f"machine:{uuid}", "machine.enrol", uuid, {"join_token": row.id})
    return cert.public_bytes(Encoding.PEM).decode()


# -- machines -------------------------------------------------------------------------------
def machine_info(machine: Machine, connected: bool) -> dict[str, Any]:
    seen = aware(machine.last_seen)
    inventory = machine.inventory or {}
    return {
        "uuid": machine.uuid,
        "hostname": machine.hostname or inventory.get("hostname", ""),
        "state": machine.state,
        "cluster": machine.cluster,
        "role": machine.role,
        "set": machine.machine_set,
        "labels": machine.labels,
        "connected": connected,
        "last_seen": seen.isoformat() if seen else None,
        "inventory": inventory,
    }


def get_machine(session: Session, uuid: str) -> Machine:
    machine = session.get(Machine, uuid.lower())
    if machine is None:
        raise NotFound(f"machine {uuid} is not enrolled in this fleet")
    return machine


def set_labels(
    session: Session, caller: Caller, uuid: str, add: dict[str, str], remove: Sequence[str]
) -> Machine:
    machine = get_machine(session, uuid)
    check_labels(add, "labels")
    labels = {k: v for k, v in machine.labels.items() if k not in remove}
    labels.update(add)
    machine.labels = labels
    audit.record(session, caller.name, "machine.labels", machine.uuid, {"labels": labels})
    return machine


def remove_machine(session: Session, caller: Caller, uuid: str) -> Machine:
    machine = get_machine(session, uuid)
    if machine.cluster:
        raise FleetError(
            f"machine {machine.uuid} is in cluster {machine.cluster}",
            hint="scale the cluster down or delete it first; the machine is then free",
        )
    machine.state = "removed"
    machine.cert_serial = ""
    machine.replica = ""  # its link is cut now
    audit.record(session, caller.name, "machine.remove", machine.uuid)
    return machine


def readmit_machine(session: Session, caller: Caller, uuid: str) -> Machine:
    machine = get_machine(session, uuid)
    if machine.state != "removed":
        raise FleetError(f"machine {machine.uuid} is {machine.state}, not removed")
    machine.state = "free"
    machine.join_token = ""
    audit.record(session, caller.name, "machine.readmit", machine.uuid)
    return machine


def link_machine(session: Session, uuid: str, serial: str) -> Machine:
    """The machine a link certificate belongs to, if it may link."""
    machine = session.get(Machine, uuid)
    if machine is None:
        raise Refused(f"machine {uuid} is not enrolled in this fleet")
    if machine.state == "removed":
        raise Refused(f"machine {uuid} was removed from this fleet")
    if machine.cert_serial != serial:
        raise Refused(f"machine {uuid}: this certificate was replaced by a newer enrolment")
    return machine


def audit_entries(session: Session, limit: int, after: int = 0) -> list[AuditEntry]:
    rows = session.execute(
        select(AuditEntry).where(AuditEntry.id > after).order_by(AuditEntry.id).limit(limit)
    )
    return list(rows.scalars())


def audit_verify(session: Session) -> list[audit.Break]:
    return audit.verify(session.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars())
