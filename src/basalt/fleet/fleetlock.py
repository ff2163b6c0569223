"""Reboot coordination: the FleetLock protocol, so Basalt's updater and other FleetLock
clients (Zincati) take a reboot slot before they reboot and give it back after.

``POST /v1/pre-reboot`` takes a slot of the client's group (a semaphore; one slot unless
an operator sets more), ``POST /v1/steady-state`` gives it back; both are idempotent.
A client whose id is the UUID of a fleet machine that is a control plane is put in its
cluster's own group, ``CLUSTER-controlplanes``, with one slot whatever it asks, and gets
it only while every other control plane of the cluster is ready (its etcd member
healthy): quorum first. Slots live in the database, so every replica sees the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from basalt.machinery.errors import ErrorKind

from . import audit
from .db import Machine, RebootGroup, RebootSlot
from .service import FleetError

_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
FLEETLOCK_LOCK = 0x666C6B  # "flk"


class SlotBusy(FleetError):
    """Every slot of the group is held (or quorum forbids a control plane's reboot)."""

    kind = ErrorKind.FAILED_PRECONDITION


@dataclass(frozen=True)
class Client:
    id: str
    group: str
    #: The other control planes of its cluster that must be ready (control planes only).
    peers: tuple[str, ...] = ()
    cluster: str = ""


def resolve(session: Session, client_id: str, group: str) -> Client:
    """Check the client's parameters; a control plane goes to its cluster's group."""
    if not client_id or len(client_id) > 253:
        raise FleetError("client_params.id: must be 1 to 253 characters")
    if not _GROUP.match(group):
        raise FleetError(
            f"client_params.group: {group!r} is not a group name (letters, digits, . _ -)"
        )
    machine = session.get(Machine, client_id.lower())
    if machine is not None and machine.role == "controlplane" and machine.cluster:
        peers = session.execute(
            select(Machine.uuid).where(
                Machine.cluster == machine.cluster,
                Machine.role == "controlplane",
                Machine.uuid != machine.uuid,
            )
        )
        return Client(
            machine.uuid,
            f"{machine.cluster}-controlplanes",
            tuple(r[0] for r in peers),
            machine.cluster,
        )
    return Client(client_id, group)


def take(session: Session, client: Client) -> bool:
    """Take a slot of the client's group; True when it holds one (now or already)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": FLEETLOCK_LOCK})
    if session.get(RebootSlot, (client.group, client.id)) is not None:
        return True
    held = session.execute(
        select(func.count()).where(RebootSlot.group_name == client.group)
    ).scalar_one()
    group = session.get(RebootGroup, client.group)
    slots = 1 if client.peers or group is None else group.slots
    if held >= slots:
        holders = ", ".join(
            r[0]
            for r in session.execute(
                select(RebootSlot.holder).where(RebootSlot.group_name == client.group)
            )
        )
        raise SlotBusy(
            f"group {client.group}: all {slots} reboot slot(s) are held (by {holders})",
            hint="try again later: the holder gives its slot back once it is healthy",
        )
    session.add(RebootSlot(group_name=client.group, holder=client.id))
    audit.record(session, f"fleetlock:{client.id}", "reboot.take", client.group)
    return True


def give_back(session: Session, client: Client) -> bool:
    """Give the client's slot back; False when it held none (still a success)."""
    row = session.get(RebootSlot, (client.group, client.id))
    if row is None:
        return False
    session.delete(row)
    audit.record(session, f"fleetlock:{client.id}", "reboot.release", client.group)
    return True


def set_slots(session: Session, actor: str, group: str, slots: int) -> None:
    if not _GROUP.match(group):
        raise FleetError(f"group: {group!r} is not a group name")
    if not 1 <= slots <= 10_000:
        raise FleetError(f"slots: {slots} is not between 1 and 10000")
    row = session.get(RebootGroup, group)
    if row is None:
        session.add(RebootGroup(name=group, slots=slots))
    else:
        row.slots = slots
    audit.record(session, actor, "reboot.group", group, {"slots": slots})


def groups(session: Session) -> list[dict[str, object]]:
    limits = {g.name: g.slots for g in session.execute(select(RebootGroup)).scalars()}
    holders: dict[str, list[str]] = {}
    for slot in session.execute(select(RebootSlot).order_by(RebootSlot.since)).scalars():
        holders.setdefault(slot.group_name, []).append(slot.holder)
    names = sorted(set(limits) | set(holders))
    return [{"group": n, "slots": limits.get(n, 1), "holders": holders.get(n, [])} for n in names]
