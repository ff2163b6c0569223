"""The fleet's database: SQLAlchemy 2 models, the engine, and sessions.

The schema is made by the Alembic migrations under ``migrations/`` (never by
``create_all``); ``tests/unit/test_fleet_db.py`` checks that migrating an empty database
gives exactly these models.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(DateTime):
    """Timestamps stored with their zone; SQLite hands them back naive, so they are
    read back as UTC (see ``_aware``)."""

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dt.datetime: UTCDateTime(),
        dict[str, Any]: JSON,
    }


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    #: Cluster names and label selectors the user is limited to (empty: all clusters).
    scope: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: scrypt hash of the web UI password ('' when the user has none: tokens only).
    password: Mapped[str] = mapped_column(String(255), default="")


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    #: SHA-256 of the token; the token itself is shown once and never stored.
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(String(200), default="")
    created: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class JoinToken(Base):
    __tablename__ = "join_tokens"

    #: Public id (shown in listings, used to revoke); the secret part is only hashed.
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    uses: Mapped[int] = mapped_column(Integer)
    used: Mapped[int] = mapped_column(Integer, default=0)
    expires: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(64))


class Machine(Base):
    __tablename__ = "machines"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: free (enrolled, in no cluster) | allocated | removed
    state: Mapped[str] = mapped_column(String(16), default="free", index=True)
    hostname: Mapped[str] = mapped_column(String(253), default="", index=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    inventory: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Serial number of the one certificate the machine may link with.
    cert_serial: Mapped[str] = mapped_column(String(64))
    join_token: Mapped[str] = mapped_column(String(16))
    cluster: Mapped[str | None] = mapped_column(String(63), nullable=True, index=True)
    enrolled: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    last_seen: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    #: The replica that holds the machine's link now ('' when none does).
    replica: Mapped[str] = mapped_column(String(64), default="")
    #: In a cluster: controlplane | worker, and the worker set's name.
    role: Mapped[str] = mapped_column(String(16), default="")
    machine_set: Mapped[str] = mapped_column(String(63), default="")
    #: The config the fleet means the machine to run (sealed: it holds keys).
    intended: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    intended_digest: Mapped[str] = mapped_column(String(64), default="")
    #: When the machine was allocated (scale-down releases the newest first).
    allocated: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class Cluster(Base):
    """A cluster as its template says it, with the secrets generated for it once."""

    __tablename__ = "clusters"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    #: The template as applied (YAML text, kept for export and for the next plan).
    template: Mapped[str] = mapped_column(Text)
    #: The secrets bundle (YAML), sealed with the secrets key.
    secrets: Mapped[bytes] = mapped_column(LargeBinary)
    endpoint: Mapped[str] = mapped_column(String(253))
    #: applying | ready | failed | deleting
    status: Mapped[str] = mapped_column(String(16), default="applying")
    message: Mapped[str] = mapped_column(Text, default="")
    bootstrapped: Mapped[bool] = mapped_column(Boolean, default=False)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    #: Nodes whose running config differs from the intended one, at the last check.
    drifted: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Append-only and hash-chained: ``digest`` covers the entry and ``previous``."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    previous: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64), unique=True)


class Replica(Base):
    """The fleet's processes on this database, and where other replicas reach them."""

    __tablename__ = "replicas"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: host:port of the replica's internal forwarding listener.
    forward: Mapped[str] = mapped_column(String(200), default="")
    seen: Mapped[dt.datetime] = mapped_column(default=utcnow)


class RebootSlot(Base):
    """A reboot slot held (FleetLock): a group's holders, at most its slots."""

    __tablename__ = "reboot_slots"

    group_name: Mapped[str] = mapped_column(String(63), primary_key=True)
    holder: Mapped[str] = mapped_column(String(253), primary_key=True)
    since: Mapped[dt.datetime] = mapped_column(default=utcnow)


class RebootGroup(Base):
    """How many machines of a group may reboot at once (1 when a group has no row)."""

    __tablename__ = "reboot_groups"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    slots: Mapped[int] = mapped_column(Integer, default=1)


class Rollout(Base):
    """A release taken to clusters in waves (see :mod:`basalt.fleet.rollouts`)."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(63))
    clusters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: canary, waves, soak, budget, timeout, windows, webhook (rollouts.Policy).
    policy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: running | paused | halted | aborted | done
    state: Mapped[str] = mapped_column(String(16), default="running", index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    #: The waves opened so far (0: only the canary).
    opened: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(64))
    created: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated: Mapped[dt.datetime] = mapped_column(default=utcnow)


class RolloutMachine(Base):
    """One machine of a rollout: its wave and how far it got."""

    __tablename__ = "rollout_machines"

    rollout: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    cluster: Mapped[str] = mapped_column(String(63))
    role: Mapped[str] = mapped_column(String(16), default="")
    wave: Mapped[int] = mapped_column(Integer)
    #: The place in the rollout's seeded order (waves cut it by percentage).
    rank: Mapped[int] = mapped_column(Integer)
    #: pending | upgrading | soaking | done | failed | rolling-back | rolled-back | skipped
    state: Mapped[str] = mapped_column(String(16), default="pending")
    #: The version being installed now (a hop of the upgrade path, or the release).
    target: Mapped[str] = mapped_column(String(64), default="")
    from_version: Mapped[str] = mapped_column(String(64), default="")
    started: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    healthy: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")


class WebSession(Base):
    """A browser's login to the web UI: the cookie is random and only its SHA-256 is
    stored; a session opened with an API token ends when that token is revoked."""

    __tablename__ = "web_sessions"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_tokens.id", ondelete="CASCADE"), nullable=True
    )
    #: The token every form and every htmx request of this session must carry.
    csrf: Mapped[str] = mapped_column(String(64))
    created: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires: Mapped[dt.datetime] = mapped_column()


class Setting(Base):
    """Small facts the fleet keeps about itself (its CA, its first admin)."""

    __tablename__ = "settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    note: Mapped[str] = mapped_column(Text, default="")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=True
        )

        @event.listens_for(engine, "connect")
        def _pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite returns naive datetimes for what was stored as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


class Database:
    """The engine and a session factory; ``session()`` commits on success."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
