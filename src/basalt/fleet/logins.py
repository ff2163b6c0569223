"""Logging in to the web UI: users' passwords and browser sessions.

A password is kept as an scrypt hash (``scrypt$n$r$p$salt$hash``, base64). A browser
session is a random cookie whose SHA-256 is stored with the user, the API token it was
opened with (if any: revoking the token ends the session), a CSRF token and an expiry.
The cookie itself authenticates only the web UI's routes (``/ui/``); the REST API still
takes tokens only, so no other site can make a browser call it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from . import audit
from .auth import Caller, FleetRole, Scope, token_digest
from .db import ApiToken, User, WebSession, aware, utcnow
from .service import FleetError, NotFound, Refused, Unauthenticated, authenticate

#: A browser session lasts this long after the login, whatever it does.
SESSION_TTL = dt.timedelta(hours=12)
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
_N, _R, _P = 2**14, 8, 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def password_matches(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        wanted = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(wanted),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, wanted)


def check_password(password: str, where: str = "password") -> None:
    if len(password) < MIN_PASSWORD:
        raise FleetError(
            f"{where}: a password has at least {MIN_PASSWORD} characters",
            hint="a passphrase of a few words is fine",
        )
    if len(password) > MAX_PASSWORD:
        raise FleetError(f"{where}: a password has at most {MAX_PASSWORD} characters")


def set_password(session: Session, actor: str, name: str, password: str) -> None:
    """Give ``name`` a web UI password ('' removes it: tokens only)."""
    user = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
    if user is None:
        raise NotFound(f"user {name!r} does not exist")
    if password:
        check_password(password)
    user.password = hash_password(password) if password else ""
    # The user's other browsers log in again with the new password.
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    audit.record(session, actor, "user.password", name, {"removed": not password})


def has_password(session: Session, name: str) -> bool:
    """Whether ``name`` can log in to the web UI with a password."""
    stored = session.execute(select(User.password).where(User.name == name)).scalar_one_or_none()
    return bool(stored)


def set_own_password(session: Session, name: str, current: str, password: str) -> None:
    """``name`` sets (or with '' removes) their own password; a user who has one gives it
    as ``current`` first, so an API token alone cannot take over the web UI login."""
    user = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
    if user is None:
        raise NotFound(f"user {name!r} does not exist")
    if user.password and not current:
        raise Refused(
            "current: give your current password to change it",
            hint="an admin can set it without: 'basaltctl fleet user password NAME'",
        )
    if user.password and not password_matches(current[:MAX_PASSWORD], user.password):
        raise Refused(
            "current: the current password is wrong",
            hint="an admin can set it without: 'basaltctl fleet user password NAME'",
        )
    set_password(session, name, name, password)


# A hash to compare against when the user does not exist: the answer takes as long.
_NOBODY = hash_password(secrets.token_urlsafe(16))


def check_login(session: Session, name: str, password: str) -> User:
    """The user whose name and password these are; one answer for every way it is wrong
    (no way to learn which users exist)."""
    user = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
    stored = user.password if user is not None and user.password else _NOBODY
    matches = password_matches(password[:MAX_PASSWORD], stored)
    if user is None or not user.password or not matches:
        raise Unauthenticated(
            "the user name or the password is wrong",
            hint="or log in with an API token ('basaltctl fleet user token NAME' makes one)",
        )
    return user


@dataclass(frozen=True)
class Opened:
    cookie: str
    csrf: str
    expires: dt.datetime


def open_session(session: Session, user: User, token: str = "", how: str = "password") -> Opened:
    token_id = None
    if token:
        token_id = session.execute(
            select(ApiToken.id).where(ApiToken.digest == token_digest(token))
        ).scalar_one()
    cookie = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    expires = utcnow() + SESSION_TTL
    # Expired sessions go when someone logs in: the table stays as small as the logins.
    session.execute(delete(WebSession).where(WebSession.expires < utcnow()))
    session.add(
        WebSession(
            digest=token_digest(cookie),
            user_id=user.id,
            token_id=token_id,
            csrf=csrf,
            expires=expires,
        )
    )
    audit.record(session, user.name, "ui.login", user.name, {"with": how})
    return Opened(cookie, csrf, expires)


def login_with_token(session: Session, token: str) -> tuple[User, Opened]:
    caller = authenticate(session, token.strip())
    user = session.execute(select(User).where(User.name == caller.name)).scalar_one()
    return user, open_session(session, user, token.strip(), "token")


@dataclass(frozen=True)
class Browser:
    caller: Caller
    csrf: str


def session_caller(session: Session, cookie: str) -> Browser:
    row = session.execute(
        select(WebSession, User)
        .join(User, User.id == WebSession.user_id)
        .where(WebSession.digest == token_digest(cookie))
    ).first()
    if row is None:
        raise Unauthenticated("the session ended", hint="log in again")
    web, user = row
    expires = aware(web.expires)
    if expires is None or expires < utcnow():
        raise Unauthenticated("the session expired", hint="log in again")
    if web.token_id is not None:
        token = session.get(ApiToken, web.token_id)
        if token is None or token.revoked:
            raise Unauthenticated("the API token of this session was revoked", hint="log in again")
    return Browser(Caller(user.name, FleetRole(user.role), Scope.from_json(user.scope)), web.csrf)


def close_session(session: Session, cookie: str) -> None:
    row = session.get(WebSession, token_digest(cookie))
    if row is not None:
        user = session.get(User, row.user_id)
        session.delete(row)
        audit.record(session, user.name if user else "?", "ui.logout", user.name if user else "?")
