"""etcd backups of the fleet's clusters, and restoring a cluster from one.

A snapshot is taken through a control plane's link with a certificate of role
``os:etcd:backup`` (made from the cluster's OS CA: it may read a snapshot, nothing
else), streamed into ``BACKUP_DIR/CLUSTER/ID.db.part`` and renamed into place with its
SHA-256 beside it once whole. A template's ``backup: {interval, keep}`` makes the
leader take one every interval and keep the newest ``keep``; ``fleet backup`` takes one
now.

Restoring (``fleet restore CLUSTER --snapshot ID``) is etcd's recover-from for the whole
cluster: every control plane is reset with EPHEMERAL wiped (its etcd data; the config on
STATE stays), the snapshot is uploaded to the first one, which bootstraps etcd from it,
and the other control planes join it again as they did when the cluster was made.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.client.client import upload
from basalt.machinery.errors import BasaltError, ErrorKind
from basalt.machinery.roles import Role

from . import audit
from . import clusters as cl
from .core import Fleet
from .db import Cluster, utcnow
from .operations import OperationError, Reconciler
from .template import interval_seconds, parse_template

log = logging.getLogger("basalt.fleet.backups")

CHUNK = 64 * 1024
#: How long a control plane's link may take to come (back) up for a backup.
LINK_WAIT = 30.0


class BackupError(BasaltError):
    kind = ErrorKind.NOT_FOUND


class Backups:
    def __init__(self, fleet: Fleet, reconciler: Reconciler) -> None:
        self.fleet = fleet
        self.reconciler = reconciler
        self.directory = fleet.options.backup_dir
        self._running: set[str] = set()
        self.restores: dict[str, asyncio.Task[None]] = {}

    # -- the store -------------------------------------------------------------------------
    def _dir(self, cluster: str) -> Path:
        return self.directory / cluster

    def snapshots(self, cluster: str) -> list[dict[str, Any]]:
        found = []
        for meta in sorted(self._dir(cluster).glob("*.json")):
            try:
                found.append(json.loads(meta.read_text()))
            except (OSError, ValueError):
                continue
        return found

    def find(self, cluster: str, snapshot: str) -> tuple[Path, dict[str, Any]]:
        for item in self.snapshots(cluster):
            if item["id"] == snapshot:
                return self._dir(cluster) / f"{snapshot}.db", item
        known = ", ".join(i["id"] for i in self.snapshots(cluster)) or "none"
        raise BackupError(
            f"cluster {cluster} has no snapshot {snapshot!r} (snapshots: {known})",
            hint=f"list them with 'basaltctl fleet backups {cluster}'",
        )

    def _prune(self, cluster: str, keep: int) -> list[str]:
        items = self.snapshots(cluster)
        dropped = []
        for item in items[: max(0, len(items) - keep)]:
            for suffix in (".db", ".json"):
                (self._dir(cluster) / f"{item['id']}{suffix}").unlink(missing_ok=True)
            dropped.append(item["id"])
        return dropped

    # -- taking one ------------------------------------------------------------------------
    def _controlplanes(self, cluster: str) -> list[Any]:
        with self.fleet.database.session() as session:
            return [
                m
                for m in cl.members(session, cluster)
                if m.role == cl.CONTROLPLANE and m.state == "allocated"
            ]

    async def take(self, cluster: str, actor: str) -> dict[str, Any]:
        if cluster in self._running:
            raise OperationError(f"a backup of {cluster} is being taken already")
        self._running.add(cluster)
        try:
            return await self._take(cluster, actor)
        finally:
            self._running.discard(cluster)

    async def _take(self, cluster: str, actor: str) -> dict[str, Any]:
        controlplanes = await asyncio.to_thread(self._controlplanes, cluster)
        if not controlplanes:
            raise OperationError(f"cluster {cluster} has no control plane to take a snapshot on")
        directory = self._dir(cluster)
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        snapshot = utcnow().strftime("%Y%m%dT%H%M%S%fZ")
        part = directory / f"{snapshot}.db.part"
        last: Exception | None = None
        for machine in controlplanes:
            digest = hashlib.sha256()
            size = 0
            try:
                with open(part, "wb") as out:
                    async with self.reconciler.nodes.client(
                        machine.uuid, cluster, wait=LINK_WAIT, role=Role.ETCD_BACKUP
                    ) as client:
                        async for chunk in client.machine.EtcdSnapshot(
                            common_pb2.Empty(), timeout=300
                        ):
                            out.write(chunk.bytes)
                            digest.update(chunk.bytes)
                            size += len(chunk.bytes)
                    out.flush()
                    os.fsync(out.fileno())
            except Exception as exc:  # this control plane could not: try the next
                last = exc
                part.unlink(missing_ok=True)
                continue
            if size == 0:
                part.unlink(missing_ok=True)
                last = OperationError(f"{machine.hostname} sent an empty snapshot")
                continue
            part.rename(directory / f"{snapshot}.db")
            item = {
                "id": snapshot,
                "cluster": cluster,
                "taken": utcnow().isoformat(),
                "size": size,
                "sha256": digest.hexdigest(),
                "node": machine.hostname,
            }
            (directory / f"{snapshot}.json").write_text(json.dumps(item) + "\n")
            await asyncio.to_thread(self._audit, actor, "cluster.backup", cluster, item)
            log.info("cluster %s: etcd snapshot %s (%d bytes) from %s", cluster, snapshot,
                     size, machine.hostname)  # fmt: skip
            return item
        raise OperationError(f"no control plane of {cluster} gave a snapshot: {last}")

    def _audit(self, actor: str, action: str, cluster: str, detail: dict[str, Any]) -> None:
        with self.fleet.database.session() as session:
            audit.record(session, actor, action, cluster, detail)

    async def tick(self) -> None:
        """On the leader: the backups templates ask for that are due."""
        from sqlalchemy import select

        def scheduled() -> list[tuple[str, float, int]]:
            with self.fleet.database.session() as session:
                rows = session.execute(select(Cluster).where(Cluster.status == "ready"))
                out = []
                for row in rows.scalars():
                    policy = parse_template(row.template, row.name).spec.backup
                    if policy is not None:
                        out.append((row.name, interval_seconds(policy.interval), policy.keep))
                return out

        for name, interval, keep in await asyncio.to_thread(scheduled):
            items = await asyncio.to_thread(self.snapshots, name)
            newest = dt.datetime.fromisoformat(items[-1]["taken"]).timestamp() if items else 0
            if time.time() - newest < interval or name in self._running:
                continue
            try:
                await self.take(name, "fleet:schedule")
            except (BasaltError, OSError) as exc:
                log.warning("scheduled backup of %s: %s", name, exc)
                continue
            dropped = await asyncio.to_thread(self._prune, name, keep)
            if dropped:
                log.info("cluster %s: dropped snapshots %s (keep %d)", name, dropped, keep)

    # -- restoring -------------------------------------------------------------------------
    def start_restore(self, cluster: str, snapshot: str, actor: str) -> dict[str, Any]:
        path, item = self.find(cluster, snapshot)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != item["sha256"]:
            raise OperationError(
                f"snapshot {snapshot} of {cluster} does not match its SHA-256: it was damaged",
                hint="restore another snapshot",
            )
        with self.fleet.database.session() as session:
            row = cl.get_cluster(session, cluster)
            row.status, row.message = "restoring", f"restoring etcd from {snapshot}"
            audit.record(session, actor, "cluster.restore", cluster, {"snapshot": snapshot})
        self.restores[cluster] = asyncio.create_task(self._restore(cluster, data, snapshot))
        return item

    async def _restore(self, cluster: str, data: bytes, snapshot: str) -> None:
        nodes = self.reconciler.nodes
        try:
            controlplanes = await asyncio.to_thread(self._controlplanes, cluster)
            for machine in controlplanes:
                async with nodes.client(machine.uuid, cluster) as client:
                    await client.machine.Reset(
                        machine_pb2.ResetRequest(
                            graceful=False, wipe_mode=machine_pb2.WipeMode.EPHEMERAL, reboot=True
                        ),
                        timeout=60,
                    )
            first = controlplanes[0]

            async def back() -> bool:
                status = await nodes.resource(first.uuid, cluster, "MachineStatuses", "machine")
                return status.get("stage") == "running"

            await asyncio.sleep(2)
            await self.reconciler._until(f"{first.hostname} to boot again", back)

            async def chunks() -> AsyncIterator[common_pb2.Data]:
                for start in range(0, len(data), CHUNK):
                    yield common_pb2.Data(bytes=data[start : start + CHUNK])

            async with nodes.client(first.uuid, cluster) as client:
                await upload(client.machine.EtcdRecover, chunks(), timeout=300)
                await client.machine.Bootstrap(
                    machine_pb2.BootstrapRequest(recover_etcd=True), timeout=60
                )
            log.info("cluster %s: etcd recovered from %s on %s", cluster, snapshot, first.hostname)
            for machine in controlplanes:
                await self.reconciler._ready(cluster, machine)
            await asyncio.to_thread(self.reconciler._status, cluster, "ready", "")
        except Exception as exc:
            message = exc.one_line() if isinstance(exc, BasaltError) else repr(exc)
            log.warning("cluster %s: restore from %s failed: %s", cluster, snapshot, message)
            await asyncio.to_thread(
                self.reconciler._status, cluster, "failed", f"restore from {snapshot}: {message}"
            )
