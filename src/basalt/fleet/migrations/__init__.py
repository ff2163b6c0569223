"""Alembic migrations of the fleet's database, run by the fleet itself at start-up.

Each revision under ``versions/`` is written by hand (they are the schema's history);
``upgrade(engine)`` brings a database to the newest. A PostgreSQL advisory lock (a
no-op on SQLite, which has one writer) keeps replicas that start together from
migrating twice.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

HERE = Path(__file__).resolve().parent
#: Advisory lock key replicas take while migrating (any constant of our own).
MIGRATION_LOCK = 0x6261736C  # "basl"


def _config(connection: object) -> object:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        command.upgrade(_config(connection), revision)  # type: ignore[arg-type]


def current(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
