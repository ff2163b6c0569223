"""Rollouts: a release taken to a channel's clusters in waves that open only on health.

A rollout of VERSION from CHANNEL covers the machines of the clusters that follow the
channel (``updates.channel`` in their template) or the clusters it names. They are put
in a seeded order: the canary first (named machines, a label, or N machines), then every
other machine by a hash of the rollout's seed and its UUID. ``waves`` cut that order by
cumulative percentage; wave 0 is the canary.

The leader's runner (:class:`RolloutRunner`) steps every running rollout about once a
second; everything it knows is in the database, so a fleet that restarts carries on:

- a machine of an open wave starts when the rollout is not paused (nor all rollouts),
  a maintenance window of the rollout is open, and it gets a reboot slot (FleetLock:
  one control plane of a cluster at a time, only while its peers are ready; workers by
  their cluster's group). It takes the next hop of the upgrade path towards VERSION
  (never a release that failed on it), sent through its link; the node verifies the
  bundle and reboots into it on trial;
- it is healthy when it runs the hop and its slot passed its gates (the slot is given
  back only then), failed when it fell back or did not come back in ``timeout``; a
  machine that reached VERSION soaks for ``soak`` and is then done;
- the next wave opens when every machine of the open waves is done and the error budget
  holds (failures as a count, or a fraction of the machines started);
- a breach halts the rollout: no machine starts any more, the release is yanked from
  the channel, every machine that took it is rolled back, the webhook is told. A node
  already upgrading finishes (and is rolled back too once it is up).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import math
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from basalt.machinery.durations import parse_duration
from basalt.machinery.errors import BasaltError
from basalt.machinery.images.versions import version_key
from basalt.machinery.releases.graph import UpgradePathError, pinned_hop
from basalt.machinery.releases.repository import Release, Repository
from basalt.machinery.windows import Window, WindowError, open_now

from . import audit, fleetlock
from .auth import Caller, FleetRole
from .db import Cluster, Machine, Rollout, RolloutMachine, Setting, aware, utcnow
from .nodes import NotLinked
from .service import Conflict, FleetError, NotFound, Refused
from .template import template_dict

log = logging.getLogger("basalt.fleet.rollouts")

ACTIVE = ("running", "paused")
#: States a machine ends a rollout in.
FINAL = ("done", "failed", "rolled-back", "skipped")
PAUSE_ALL = "rollouts.paused"
STEP = 1.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _duration(value: str) -> str:
    if parse_duration(value) is None:
        raise ValueError(f"{value!r} is not a duration (e.g. 90s, 10m, 1h)")
    return value


class Canary(_Model):
    """The first wave: named machines, machines with these labels, or else ``count``."""

    machines: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    count: int = Field(default=1, ge=1, le=1000)


class MaintenanceWindow(_Model):
    cron: str
    duration: str
    timezone: str = "UTC"

    def window(self) -> Window:
        return Window(self.cron, dt.timedelta(seconds=parse_duration(self.duration) or 0),
                      self.timezone)  # fmt: skip


class Policy(_Model):
    canary: Canary = Field(default_factory=Canary)
    #: Cumulative percentages of the machines after the canary; the last is 100.
    waves: list[int] = Field(default_factory=lambda: [25, 50, 100])
    soak: str = "5m"
    max_failures: int = Field(default=1, ge=0, alias="maxFailures")
    max_failure_fraction: float | None = Field(default=None, gt=0, le=1, alias="maxFailureFraction")
    timeout: str = "15m"
    windows: list[MaintenanceWindow] = Field(default_factory=list)
    webhook: str = ""
    seed: str = ""

    @field_validator("soak", "timeout")
    @classmethod
    def _durations(cls, value: str) -> str:
        return _duration(value)

    @field_validator("waves")
    @classmethod
    def _waves(cls, value: list[int]) -> list[int]:
        if not value or value[-1] != 100:
            raise ValueError("the last wave must be 100 (every machine)")
        if any(not 0 < p <= 100 for p in value) or value != sorted(set(value)):
            raise ValueError("percentages from 1 to 100, each larger than the one before")
        return value

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[MaintenanceWindow]) -> list[MaintenanceWindow]:
        for index, window in enumerate(value):
            try:
                window.window().check()
            except WindowError as exc:
                raise ValueError(f"windows[{index}]: {exc}") from None
        return value

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("an http(s) URL")
        return value

    def soak_seconds(self) -> float:
        return parse_duration(self.soak) or 0.0

    def timeout_seconds(self) -> float:
        return parse_duration(self.timeout) or 900.0


def parse_policy(data: dict[str, Any], where: str = "policy") -> Policy:
    """A rollout policy from JSON; the first error names its field (``policy.soak``)."""
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(p) for p in (where, *first["loc"]))
        raise FleetError(f"{path}: {str(first['msg']).removeprefix('Value error, ')}") from None


# -- planning ---------------------------------------------------------------------------


def _rank_key(seed: str, uuid: str) -> str:
    return hashlib.sha256(f"{seed}/{uuid}".encode()).hexdigest()


def _following(session: Session, channel: str) -> list[str]:
    names = []
    for cluster in session.execute(select(Cluster)).scalars():
        updates = template_dict(cluster.template).get("updates") or {}
        if isinstance(updates, dict) and updates.get("channel") == channel:
            names.append(cluster.name)
    return sorted(names)


def plan_waves(
    machines: Sequence[Machine], policy: Policy, seed: str
) -> list[tuple[Machine, int, int]]:
    """(machine, wave, rank) for each machine: the canary first, then the seeded order."""
    canary = policy.canary
    if canary.machines:
        chosen = [m for m in machines if m.uuid in {u.lower() for u in canary.machines}]
        missing = sorted({u.lower() for u in canary.machines} - {m.uuid for m in chosen})
        if missing:
            raise FleetError(
                f"canary.machines: {', '.join(missing)} not in the rollout's clusters",
                hint="name machines of the clusters the rollout covers",
            )
    elif canary.labels:
        chosen = [
            m for m in machines if all(m.labels.get(k) == v for k, v in canary.labels.items())
        ]
        if not chosen:
            raise FleetError(
                f"canary.labels: no machine of the rollout's clusters has {canary.labels}"
            )
    else:
        ordered = sorted(machines, key=lambda m: _rank_key(seed, m.uuid))
        # A worker first when there is one: a canary that breaks no quorum.
        ordered.sort(key=lambda m: m.role == "controlplane")
        chosen = ordered[: canary.count]
    chosen_ids = {m.uuid for m in chosen}
    rest = sorted((m for m in machines if m.uuid not in chosen_ids),
                  key=lambda m: _rank_key(seed, m.uuid))  # fmt: skip
    planned = [(m, 0, i) for i, m in enumerate(chosen)]
    total = len(rest)
    for rank, machine in enumerate(rest):
        wave = next(i + 1 for i, p in enumerate(policy.waves) if rank < math.ceil(total * p / 100))
        planned.append((machine, wave, len(chosen) + rank))
    return planned


def create(
    session: Session,
    actor: str,
    version: str,
    channel: str,
    releases: Sequence[Release],
    clusters: Sequence[str] = (),
    policy: Policy | None = None,
) -> Rollout:
    """A new running rollout (refused, changing nothing, when it cannot be one)."""
    policy = policy or Policy()
    offered = [r for r in releases if r.version == version]
    if not offered:
        have = ", ".join(sorted({r.version for r in releases}, key=version_key)) or "none"
        raise NotFound(f"version: {version} is not in channel {channel} (there: {have})")
    if all(r.yanked for r in offered):
        raise FleetError(f"version: {version} is yanked in channel {channel}")
    names = sorted(set(clusters)) or _following(session, channel)
    if not names:
        raise FleetError(
            f"no cluster follows channel {channel}",
            hint="set 'updates: {channel: " + channel + "}' in a cluster template, or "
            "name clusters with --cluster",
        )
    for name in names:
        if session.get(Cluster, name) is None:
            raise NotFound(f"clusters: no cluster {name!r}")
    for other in session.execute(select(Rollout).where(Rollout.state.in_(ACTIVE))).scalars():
        overlap = sorted(set(other.clusters.get("names", [])) & set(names))
        if overlap:
            raise Conflict(
                f"rollout {other.id} ({other.version}) is {other.state} on {', '.join(overlap)}",
                hint=f"let it finish, or abort it: basaltctl fleet rollout abort {other.id}",
            )
    machines = list(
        session.execute(
            select(Machine).where(Machine.cluster.in_(names), Machine.state == "allocated")
        ).scalars()
    )
    if not machines:
        raise FleetError(f"the clusters {', '.join(names)} have no machines")
    rollout = Rollout(
        version=version,
        channel=channel,
        clusters={"names": names},
        policy=policy.model_dump(by_alias=True),
        state="running",
        created_by=actor,
    )
    session.add(rollout)
    session.flush()
    seed = policy.seed or f"rollout-{rollout.id}"
    for machine, wave, rank in plan_waves(machines, policy, seed):
        session.add(
            RolloutMachine(
                rollout=rollout.id,
                uuid=machine.uuid,
                cluster=machine.cluster or "",
                role=machine.role,
                wave=wave,
                rank=rank,
                from_version=str((machine.inventory or {}).get("version", "")),
            )
        )
    audit.record(
        session, actor, "rollout.create", f"rollout/{rollout.id}",
        {"version": version, "channel": channel, "clusters": names, "machines": len(machines)},
    )  # fmt: skip
    return rollout


def get(session: Session, rollout_id: int) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"no rollout {rollout_id}")
    return rollout


def machines_of(session: Session, rollout_id: int) -> list[RolloutMachine]:
    return list(
        session.execute(
            select(RolloutMachine)
            .where(RolloutMachine.rollout == rollout_id)
            .order_by(RolloutMachine.rank)
        ).scalars()
    )


def summary(session: Session, rollout: Rollout) -> dict[str, Any]:
    rows = machines_of(session, rollout.id)
    waves = 1 + len(rollout.policy.get("waves", []))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    return {
        "id": rollout.id,
        "version": rollout.version,
        "channel": rollout.channel,
        "clusters": rollout.clusters.get("names", []),
        "state": rollout.state,
        "reason": rollout.reason,
        "wave": rollout.opened,
        "waves": waves,
        "machines": len(rows),
        "done": counts.get("done", 0),
        "healthy": counts.get("done", 0) + counts.get("soaking", 0),
        "upgrading": counts.get("upgrading", 0),
        "failed": counts.get("failed", 0),
        "rolledBack": counts.get("rolled-back", 0),
        "createdBy": rollout.created_by,
        "created": (aware(rollout.created) or utcnow()).isoformat(timespec="seconds"),
    }


def _row(row: RolloutMachine) -> dict[str, Any]:
    return {
        "uuid": row.uuid,
        "cluster": row.cluster,
        "role": row.role,
        "wave": row.wave,
        "state": row.state,
        "target": row.target,
    }


def detail(session: Session, rollout: Rollout) -> dict[str, Any]:
    return {
        **summary(session, rollout),
        "policy": rollout.policy,
        "machineStates": [
            {**_row(r), "from": r.from_version, "message": r.message}
            for r in machines_of(session, rollout.id)
        ],
    }


def set_state(session: Session, actor: str, rollout_id: int, action: str) -> Rollout:
    """pause | resume | abort, audited."""
    rollout = get(session, rollout_id)
    wanted = {"pause": ("running", "paused"), "resume": ("paused", "running"),
              "abort": (None, "aborted")}[action]  # fmt: skip
    if rollout.state not in ACTIVE or (wanted[0] and rollout.state != wanted[0]):
        raise Conflict(f"rollout {rollout_id} is {rollout.state}: it cannot {action}")
    rollout.state = wanted[1]
    if action == "abort":
        rollout.reason = f"aborted by {actor}"
        for row in machines_of(session, rollout_id):
            if row.state == "pending":
                row.state = "skipped"
    rollout.updated = utcnow()
    audit.record(session, actor, f"rollout.{action}", f"rollout/{rollout_id}")
    return rollout


def pause_all(session: Session, actor: str, paused: bool) -> None:
    row = session.get(Setting, PAUSE_ALL)
    if row is None:
        session.add(Setting(name=PAUSE_ALL, value=b"1" if paused else b"0"))
    else:
        row.value = b"1" if paused else b"0"
    audit.record(session, actor, "rollout.pause-all" if paused else "rollout.resume-all")


def all_paused(session: Session) -> bool:
    row = session.get(Setting, PAUSE_ALL)
    return row is not None and row.value == b"1"


def failed_versions(session: Session, uuid: str) -> set[str]:
    """Releases that failed on this machine in any rollout: never offered to it again."""
    rows = session.execute(
        select(RolloutMachine.target).where(
            RolloutMachine.uuid == uuid, RolloutMachine.state == "failed"
        )
    )
    return {str(r[0]) for r in rows if r[0]}


def evidence(session: Session, version: str, now: dt.datetime) -> dict[str, Any]:
    """What the fleet saw of ``version``: machines that ran it healthy, since when, and
    failures (the promotion rule's input)."""
    healthy: list[dt.datetime] = []
    failures = 0
    for rollout in session.execute(select(Rollout).where(Rollout.version == version)).scalars():
        for row in machines_of(session, rollout.id):
            if row.state == "failed" and row.target == version:
                failures += 1
            elif row.state in ("soaking", "done") and row.healthy is not None:
                healthy.append(aware(row.healthy) or now)
    ran = (now - min(healthy)).total_seconds() if healthy else 0.0
    return {"version": version, "machines": len(healthy), "seconds": ran, "fallbacks": failures}


def promote(
    session: Session,
    caller: Caller,
    repository: Repository,
    version: str,
    source: str,
    destination: str,
    rule: tuple[int, float],
    force: bool = False,
) -> dict[str, Any]:
    """Promote ``version`` from ``source`` to ``destination`` when the fleet's evidence
    meets ``rule`` (machines, seconds); ``force`` skips it, for fleet:admin only. Audited."""
    seen = evidence(session, version, dt.datetime.now(dt.UTC))
    short = shortfalls(seen, *rule)
    if short and not force:
        raise Conflict(
            f"{version} is not promoted from {source} to {destination}: {'; '.join(short)}",
            hint="roll it out on the source channel first, or --force (fleet:admin, audited)",
        )
    if short and not caller.role.allows(FleetRole.ADMIN):
        raise Refused(f"--force needs fleet:admin; {caller.name} is {caller.role}")
    added = repository.promote(version, source, destination)
    audit.record(
        session, caller.name, "release.promote", f"{destination}/{version}",
        {"from": source, "forced": bool(short), "short": short, "evidence": seen},
    )  # fmt: skip
    return {"promoted": [r.path for r in added], "forced": bool(short), "evidence": seen}


def shortfalls(seen: dict[str, Any], min_machines: int, min_seconds: float) -> list[str]:
    """What keeps ``seen`` (:func:`evidence`) from meeting the promotion rule; [] when it
    holds."""
    short = []
    if seen["fallbacks"]:
        short.append(f"it fell back on {seen['fallbacks']} machine(s)")
    if seen["machines"] < min_machines:
        short.append(f"{seen['machines']} machine(s) ran it healthy, the rule wants {min_machines}")
    elif seen["seconds"] < min_seconds:
        short.append(
            f"it ran for {seen['seconds'] / 3600:.1f} h, the rule wants {min_seconds / 3600:.1f} h"
        )
    return short


# -- running ----------------------------------------------------------------------------


class NodeOps(Protocol):
    """What the runner needs of the machines (``operations.Nodes``; a fake in unit tests)."""

    async def resource(self, uuid: str, cluster: str, kind: str, rid: str) -> dict[str, Any]: ...

    async def upgrade(self, uuid: str, cluster: str, bundle: Path) -> str: ...

    async def rollback(self, uuid: str, cluster: str) -> str: ...

    async def peers_ready(self, peers: tuple[str, ...], cluster: str) -> str: ...


@dataclass
class _Started:
    uuid: str
    hop: Release


class RolloutRunner:
    """Steps every active rollout (on the leader)."""

    def __init__(
        self,
        database: Any,
        ops: NodeOps,
        repository: Path | None,
        *,
        now: Any = utcnow,
        leading: Any = lambda: True,
    ) -> None:
        self.database = database
        self.ops = ops
        self.repository = Repository(repository) if repository is not None else None
        self.now = now
        self.leading = leading
        self.task: asyncio.Task[None] | None = None
        self._starting: set[str] = set()

    # -- the loop ------------------------------------------------------------------------
    def ensure(self) -> None:
        """Start the loop if it is not running (called on every leader tick)."""
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._loop(), name="rollouts")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                if self.leading():
                    await self.step_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rollout step failed")
            await asyncio.sleep(STEP)

    def _active(self) -> list[int]:
        with self.database.session() as session:
            in_flight = select(RolloutMachine.rollout).where(
                RolloutMachine.state.in_(("upgrading", "rolling-back"))
            )
            # A halted rollout stays active until every machine that took it is back.
            to_roll_back = select(RolloutMachine.rollout).where(
                RolloutMachine.state.in_(("soaking", "done"))
            )
            rows = session.execute(
                select(Rollout.id).where(
                    Rollout.state.in_(ACTIVE)
                    | Rollout.id.in_(in_flight)
                    | ((Rollout.state == "halted") & Rollout.id.in_(to_roll_back))
                )
            )
            return [int(r[0]) for r in rows]

    async def step_all(self) -> None:
        for rollout_id in await asyncio.to_thread(self._active):
            await self.step(rollout_id)

    # -- one step ------------------------------------------------------------------------
    def _load(self, rollout_id: int) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
        with self.database.session() as session:
            rollout = get(session, rollout_id)
            head = {
                "id": rollout.id,
                "version": rollout.version,
                "channel": rollout.channel,
                "state": rollout.state,
                "opened": rollout.opened,
                "policy": Policy.model_validate(rollout.policy),
            }
            rows = [
                {**_row(r), "started": aware(r.started), "healthy": aware(r.healthy)}
                for r in machines_of(session, rollout_id)
            ]
            return head, rows, all_paused(session)

    def _update(self, rollout_id: int, uuid: str, **fields: Any) -> None:
        with self.database.session() as session:
            row = session.get(RolloutMachine, (rollout_id, uuid))
            assert row is not None
            for key, value in fields.items():
                setattr(row, key, value)

    def _give_back(self, uuid: str, cluster: str) -> None:
        with self.database.session() as session:
            client = fleetlock.resolve(session, uuid, cluster)
            fleetlock.give_back(session, client)

    async def step(self, rollout_id: int) -> None:
        head, rows, paused_all = await asyncio.to_thread(self._load, rollout_id)
        policy: Policy = head["policy"]
        now = self.now()
        for row in rows:
            if row["state"] == "upgrading":
                await self._watch(head, row, policy, now)
            elif row["state"] == "rolling-back":
                await self._watch_rollback(head, row, policy, now)
            elif (
                row["state"] == "soaking"
                and row["healthy"] is not None
                and (now - row["healthy"]).total_seconds() >= policy.soak_seconds()
            ):
                await asyncio.to_thread(self._update, rollout_id, row["uuid"], state="done",
                                            message="soaked")  # fmt: skip
        head, rows, paused_all = await asyncio.to_thread(self._load, rollout_id)
        if head["state"] in ("halted", "aborted", "done"):
            if head["state"] == "halted":
                await self._roll_back(head, rows)
            return
        breach = self._breach(rows, policy)
        if breach:
            await self.halt(rollout_id, breach)
            return
        opened = head["opened"]
        last_wave = len(policy.waves)
        while all(r["state"] in FINAL for r in rows if r["wave"] <= opened):
            if opened >= last_wave:
                await asyncio.to_thread(self._finish, rollout_id)
                return
            opened += 1
            await asyncio.to_thread(self._open_wave, rollout_id, opened)
        if head["state"] != "running" or paused_all:
            return
        windows = [w.window() for w in policy.windows]
        if not open_now(windows, now):
            return
        # Never more machines in flight than the budget has failures left, plus one:
        # however the release breaks, the budget is overrun by one machine at most.
        room = self._room(rows, policy) - sum(1 for r in rows if r["state"] == "upgrading")
        for row in rows:
            if room <= 0:
                break
            started = row["state"] == "pending" and row["wave"] <= opened
            if started and await self._start(head, row):
                room -= 1

    def _breach(self, rows: list[dict[str, Any]], policy: Policy) -> str:
        canary = [r["uuid"] for r in rows if r["wave"] == 0 and r["state"] == "failed"]
        if canary:
            return f"the canary failed ({', '.join(canary)}): the release stops here"
        failed = sum(1 for r in rows if r["state"] == "failed")
        started = sum(1 for r in rows if r["state"] not in ("pending", "skipped"))
        if failed > policy.max_failures and policy.max_failure_fraction is None:
            return f"{failed} machine(s) failed; the error budget allows {policy.max_failures}"
        fraction = policy.max_failure_fraction
        if fraction is not None and started and failed / started > fraction:
            return (
                f"{failed} of {started} machines failed, more than the error budget's "
                f"{fraction:.0%}"
            )
        return ""

    def _room(self, rows: list[dict[str, Any]], policy: Policy) -> int:
        failed = sum(1 for r in rows if r["state"] == "failed")
        if policy.max_failure_fraction is not None:
            allowed = math.floor(policy.max_failure_fraction * len(rows))
        else:
            allowed = policy.max_failures
        if any(r["wave"] == 0 for r in rows if r["state"] not in FINAL):
            return 1  # the canary goes alone
        return max(1, allowed - failed + 1)

    def _open_wave(self, rollout_id: int, wave: int) -> None:
        with self.database.session() as session:
            rollout = get(session, rollout_id)
            rollout.opened = wave
            rollout.updated = utcnow()
            audit.record(session, "fleet", "rollout.wave", f"rollout/{rollout_id}", {"wave": wave})
        log.info("rollout %d: wave %d opens", rollout_id, wave)

    def _finish(self, rollout_id: int) -> None:
        with self.database.session() as session:
            rollout = get(session, rollout_id)
            rollout.state = "done"
            rollout.reason = "every machine runs the release"
            rollout.updated = utcnow()
            audit.record(session, "fleet", "rollout.done", f"rollout/{rollout_id}")
            payload = {"event": "done", **summary(session, rollout)}
            webhook = str(rollout.policy.get("webhook", ""))
        if webhook:
            self._notify(webhook, payload)

    # -- a machine -----------------------------------------------------------------------
    def _releases(self, channel: str) -> list[Release]:
        if self.repository is None:
            raise FleetError(
                "this fleet serves no release repository",
                hint="start basalt-fleet with --releases DIR",
            )
        return self.repository.releases(channel)

    def _take_slot(self, uuid: str, cluster: str) -> fleetlock.Client:
        with self.database.session() as session:
            client = fleetlock.resolve(session, uuid, cluster)
            fleetlock.take(session, client)
            return client

    async def _slot(self, uuid: str, cluster: str) -> bool:
        """Take the machine's reboot slot (a control plane's only while its peers are
        ready); False: not now."""
        try:
            client = await asyncio.to_thread(self._take_slot, uuid, cluster)
        except fleetlock.SlotBusy:
            return False
        if client.peers and await self.ops.peers_ready(client.peers, cluster):
            await asyncio.to_thread(self._give_back, uuid, cluster)
            return False
        return True

    async def _start(self, head: dict[str, Any], row: dict[str, Any]) -> bool:
        """Start the machine's next hop; True when an upgrade is now in flight."""
        uuid, cluster = row["uuid"], row["cluster"]
        if uuid in self._starting:
            return False
        try:
            boot = await self.ops.resource(uuid, cluster, "BootStatuses", "boot")
        except Exception as exc:
            log.info("rollout %d: %s cannot be asked yet: %s", head["id"], uuid, exc)
            return False
        current = str(boot.get("version", ""))
        if boot.get("onTrial"):
            return False  # something else upgrades it: look again later

        def plan() -> Release | None:
            with self.database.session() as session:
                refused = failed_versions(session, uuid)
            return pinned_hop(current, self._releases(head["channel"]), head["version"],
                              refused=refused)  # fmt: skip

        try:
            hop = await asyncio.to_thread(plan)
        except (UpgradePathError, FleetError) as exc:
            await asyncio.to_thread(self._update, head["id"], uuid, state="failed",
                                    message=exc.one_line())  # fmt: skip
            return False
        if hop is None:
            await asyncio.to_thread(
                self._update, head["id"], uuid, state="soaking", healthy=self.now(),
                target=head["version"], message=f"runs {current} already",
            )  # fmt: skip
            return False
        if not await self._slot(uuid, cluster):
            return False
        self._starting.add(uuid)
        try:
            bundle = await asyncio.to_thread(self._bundle, hop)
            await asyncio.to_thread(self._update, head["id"], uuid, state="upgrading",
                                    target=hop.version, started=self.now(),
                                    message=f"upgrading {current} -> {hop.version}")  # fmt: skip
            message = await self.ops.upgrade(uuid, cluster, bundle)
            log.info("rollout %d: %s: %s", head["id"], uuid, message)
            return True
        except Exception as exc:
            transient = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if isinstance(exc, grpc.aio.AioRpcError | NotLinked) and (
                isinstance(exc, NotLinked) or exc.code() in transient
            ):
                # The machine could not be reached: nothing changed on it, try later.
                log.info("rollout %d: %s not reached, later: %s", head["id"], uuid, exc)
                await asyncio.to_thread(self._update, head["id"], uuid, state="pending",
                                        message=f"not reached: {exc}")  # fmt: skip
                await asyncio.to_thread(self._give_back, uuid, cluster)
                return False
            if isinstance(exc, grpc.aio.AioRpcError):
                text = f"{exc.code().name}: {exc.details()}"
            else:
                text = exc.one_line() if isinstance(exc, BasaltError) else str(exc)
            await asyncio.to_thread(self._update, head["id"], uuid, state="failed",
                                    target=hop.version, message=f"refused: {text}")  # fmt: skip
            await asyncio.to_thread(self._give_back, uuid, cluster)
            return True  # it counts: a failure
        finally:
            self._starting.discard(uuid)

    def _bundle(self, hop: Release) -> Path:
        """The hop's bundle in the repository, checked against its signed hash."""
        assert self.repository is not None
        path = self.repository.targets / hop.path
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != hop.sha256:
            raise FleetError(f"{path}: does not match the hash its channel signed: refused")
        return path

    async def _watch(
        self, head: dict[str, Any], row: dict[str, Any], policy: Policy, now: dt.datetime
    ) -> None:
        uuid, cluster, target = row["uuid"], row["cluster"], row["target"]
        try:
            boot = await self.ops.resource(uuid, cluster, "BootStatuses", "boot")
        except Exception:
            boot = None  # rebooting
        started = row["started"] or now
        if boot is not None and not boot.get("onTrial"):
            if boot.get("version") == target:
                await asyncio.to_thread(self._give_back, uuid, cluster)
                reached = target == head["version"]
                await asyncio.to_thread(
                    self._update, head["id"], uuid,
                    state="soaking" if reached else "pending",
                    healthy=now if reached else None,
                    message=f"{target} passed its health gates",
                )  # fmt: skip
                return
            if boot.get("fellBackFrom") and boot.get("previousVersion") == target:
                await asyncio.to_thread(self._give_back, uuid, cluster)
                await asyncio.to_thread(
                    self._update, head["id"], uuid, state="failed",
                    message=f"fell back from {target}: {boot.get('reason', '')}",
                )  # fmt: skip
                return
        if (now - started).total_seconds() > policy.timeout_seconds():
            await asyncio.to_thread(self._give_back, uuid, cluster)
            await asyncio.to_thread(
                self._update, head["id"], uuid, state="failed",
                message=f"not back healthy on {target} within {policy.timeout}",
            )  # fmt: skip

    # -- halting -------------------------------------------------------------------------
    async def halt(self, rollout_id: int, reason: str) -> None:
        """Stop starting machines, yank the release, roll back who took it, notify."""

        def mark() -> tuple[dict[str, Any], str]:
            with self.database.session() as session:
                rollout = get(session, rollout_id)
                rollout.state = "halted"
                rollout.reason = reason
                rollout.updated = utcnow()
                for row in machines_of(session, rollout_id):
                    if row.state == "pending":
                        row.state = "skipped"
                audit.record(session, "fleet", "rollout.halt", f"rollout/{rollout_id}",
                             {"reason": reason})  # fmt: skip
                return {"event": "halted", **summary(session, rollout)}, str(
                    rollout.policy.get("webhook", "")
                )

        payload, webhook = await asyncio.to_thread(mark)
        log.warning("rollout %d halted: %s", rollout_id, reason)
        yanked = await asyncio.to_thread(self._yank, rollout_id)
        payload["yanked"] = yanked
        head, rows, _ = await asyncio.to_thread(self._load, rollout_id)
        await self._roll_back(head, rows)
        if webhook:
            await asyncio.to_thread(self._notify, webhook, payload)

    def _yank(self, rollout_id: int) -> str:
        with self.database.session() as session:
            rollout = get(session, rollout_id)
            version, channel = rollout.version, rollout.channel
        try:
            if self.repository is None:
                raise FleetError("no release repository (--releases)")
            self.repository.yank(version, [channel])
        except BasaltError as exc:
            note = f"could not yank {version} from {channel}: {exc.one_line()}"
            log.error("rollout %d: %s", rollout_id, note)
            with self.database.session() as session:
                rollout = get(session, rollout_id)
                rollout.reason = f"{rollout.reason}; {note}"
            return ""
        with self.database.session() as session:
            audit.record(session, "fleet", "release.yank", f"{channel}/{version}",
                         {"rollout": rollout_id})  # fmt: skip
        return f"{channel}/{version}"

    async def _roll_back(self, head: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Every machine of a halted rollout that runs the release goes back, each with
        its reboot slot (control planes one at a time, only while their peers are ready),
        so a rollback never costs quorum."""
        for row in rows:
            if row["state"] not in ("soaking", "done") or row["target"] != head["version"]:
                continue
            uuid, cluster = row["uuid"], row["cluster"]
            if not await self._slot(uuid, cluster):
                continue  # the next step tries again
            try:
                message = await self.ops.rollback(uuid, cluster)
            except Exception as exc:
                await asyncio.to_thread(self._give_back, uuid, cluster)
                transient = isinstance(exc, NotLinked) or (
                    isinstance(exc, grpc.aio.AioRpcError)
                    and exc.code()
                    in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                )
                log.warning("rollout %d: rollback of %s failed: %s", head["id"], uuid, exc)
                if not transient:  # refused by the node: say so, do not ask again
                    detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc
                    await asyncio.to_thread(self._update, head["id"], uuid, state="failed",
                                            message=f"rollback refused: {detail}")  # fmt: skip
                continue
            await asyncio.to_thread(self._update, head["id"], uuid, state="rolling-back",
                                    started=self.now(), message=message)  # fmt: skip

    async def _watch_rollback(
        self, head: dict[str, Any], row: dict[str, Any], policy: Policy, now: dt.datetime
    ) -> None:
        uuid, cluster = row["uuid"], row["cluster"]
        try:
            boot = await self.ops.resource(uuid, cluster, "BootStatuses", "boot")
        except Exception:
            boot = None  # rebooting
        back = boot is not None and not boot.get("onTrial") and boot.get("version") != row["target"]
        late = (now - (row["started"] or now)).total_seconds() > policy.timeout_seconds()
        if back or late:
            await asyncio.to_thread(self._give_back, uuid, cluster)
            await asyncio.to_thread(
                self._update, head["id"], uuid, state="rolled-back" if back else "failed",
                message=f"back on {boot.get('version')}" if back and boot else
                f"not back from {row['target']} within {policy.timeout}",
            )  # fmt: skip

    def _notify(self, url: str, payload: dict[str, Any]) -> None:
        request = urllib.request.Request(
            url,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except OSError as exc:
            log.warning("webhook %s failed: %s", url, exc)
