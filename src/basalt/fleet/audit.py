"""The audit log: append-only, each entry hash-chained to the one before.

``digest = SHA-256(previous digest || canonical JSON of the entry)``. Verifying walks the
log in order and recomputes each digest: an edited entry no longer matches its digest,
and a removed one leaves the next entry pointing at a digest that is not its
predecessor's. Appends are serialized (a PostgreSQL advisory lock across replicas; on
SQLite the database's single writer) so the chain never forks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from .db import AuditEntry, aware, utcnow

GENESIS = "0" * 64
AUDIT_LOCK = 0x61756474  # "audt"


def _canonical(entry: AuditEntry) -> bytes:
    at = aware(entry.at)
    assert at is not None
    body = {
        "id": entry.id,
        "at": at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "detail": entry.detail,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def digest_of(entry: AuditEntry) -> str:
    return hashlib.sha256(entry.previous.encode() + _canonical(entry)).hexdigest()


def record(
    session: Session,
    actor: str,
    action: str,
    target: str = "",
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append an entry in ``session``'s transaction (it commits with the change it
    records, or not at all)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": AUDIT_LOCK})
    last = session.execute(
        select(AuditEntry.id, AuditEntry.digest).order_by(AuditEntry.id.desc()).limit(1)
    ).first()
    previous = last.digest if last else GENESIS
    entry = AuditEntry(
        id=(last.id + 1) if last else 1,
        at=utcnow(),
        actor=actor,
        action=action,
        target=target,
        detail=detail or {},
        previous=previous,
        digest="",
    )
    entry.digest = digest_of(entry)
    session.add(entry)
    session.flush()
    return entry


@dataclass(frozen=True)
class Break:
    """Where the chain breaks and how."""

    entry: int
    reason: str


def verify(entries: Iterable[AuditEntry]) -> list[Break]:
    """Every place the chain does not hold (empty: the log is intact)."""
    breaks: list[Break] = []
    previous = GENESIS
    expected_id = 1
    for entry in entries:
        if entry.id != expected_id:
            breaks.append(Break(entry.id, f"entries {expected_id}..{entry.id - 1} are missing"))
        if entry.previous != previous:
            breaks.append(
                Break(entry.id, "does not follow the entry before it (one was removed or changed)")
            )
        if digest_of(entry) != entry.digest:
            breaks.append(Break(entry.id, "its content does not match its digest (edited)"))
        previous = entry.digest
        expected_id = entry.id + 1
    return breaks


def as_dict(entry: AuditEntry) -> dict[str, Any]:
    at = aware(entry.at)
    return {
        "id": entry.id,
        "at": at.isoformat() if at else "",
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "detail": entry.detail,
        "digest": entry.digest,
    }
