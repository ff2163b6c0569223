"""What the fleet does to nodes: make a cluster match its plan, read drift, fetch
secrets from nodes. Everything travels through machines' links (``nodes.node_client``).

A cluster whose status is ``applying`` is reconciled until it is ``ready`` or
``failed``: configs sent (maintenance ``apply-config`` to new machines, the least
disruptive mode to running ones), etcd bootstrapped once, every node waited for, and
released machines reset (a graceful reset leaves etcd) back to maintenance, where they
are free again. Each step is idempotent and the state is in the database, so a fleet
that restarts mid-way picks the cluster up where it was (``resume``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from basalt.machinery.api import common_pb2, machine_pb2, resource_pb2
from basalt.machinery.client.client import MAINTENANCE_SERVER_NAME, APIError, Client
from basalt.machinery.errors import BasaltError
from basalt.machinery.pki import CertificateAndKey, issue_certificate
from basalt.machinery.roles import Role

from . import clusters as cl
from .core import Fleet
from .db import Cluster, Machine, utcnow
from .nodes import NotLinked, maintenance_certificate, node_client
from .replicas import Replicas

log = logging.getLogger("basalt.fleet.operations")

LINK_WAIT = 120.0
DRIFT_INTERVAL = 60.0
READY_TIMEOUT = 300.0
POLL = 1.0


class OperationError(BasaltError):
    pass


class Nodes:
    """Calls to nodes of the fleet's clusters, with the fleet's own admin certificate."""

    def __init__(self, fleet: Fleet, replicas: Replicas | None = None) -> None:
        self.fleet = fleet
        self.replicas = replicas
        self._credentials: dict[tuple[str, Role], tuple[float, str, CertificateAndKey]] = {}

    def credentials(self, cluster: str, role: Role = Role.ADMIN) -> tuple[str, CertificateAndKey]:
        """The cluster's OS CA and a client certificate of the fleet's with ``role``
        (made from the cluster's secrets, kept for six hours)."""
        cached = self._credentials.get((cluster, role))
        if cached is not None and cached[0] > time.time():
            return cached[1], cached[2]
        with self.fleet.database.session() as session:
            secrets = cl.cluster_secrets(cl.get_cluster(session, cluster), self.fleet.box)
        os_ca = CertificateAndKey(secrets.certs.os.crt, secrets.certs.os.key)
        issued = issue_certificate(
            os_ca,
            "basalt-fleet",
            organizations=[role.value],
            client=True,
            validity=dt.timedelta(hours=12),
        )
        self._credentials[(cluster, role)] = (time.time() + 6 * 3600, os_ca.crt, issued)
        return os_ca.crt, issued

    def _address(self, uuid: str) -> str:
        link = self.fleet.links.links.get(uuid)
        if link is not None:
            return str(link.inventory.get("api_address", ""))
        with self.fleet.database.session() as session:
            machine = session.get(Machine, uuid)
            return str((machine.inventory or {}).get("api_address", "")) if machine else ""

    async def socket(self, uuid: str, wait: float = 0.0) -> Any:
        """A Unix socket to the machine's API: its link here, or through the replica
        that holds it."""
        deadline = time.monotonic() + wait
        while True:
            link = self.fleet.links.links.get(uuid)
            if link is not None:
                return await link.socket_path(self.fleet.links.socket_dir)
            if self.replicas is not None:
                remote = await self.replicas.remote_socket(uuid)
                if remote is not None:
                    return remote
            if time.monotonic() >= deadline:
                raise NotLinked(f"machine {uuid} has no link to this fleet now")
            await asyncio.sleep(POLL)

    @asynccontextmanager
    async def client(
        self, uuid: str, cluster: str | None, wait: float = 0.0, role: Role = Role.ADMIN
    ) -> AsyncIterator[Client]:
        """mTLS with a certificate of ``role`` from the cluster's OS CA, or (``cluster``
        None) the maintenance API's certificate taken on first use."""
        socket = await self.socket(uuid, wait)
        if cluster is None:
            async with node_client(socket) as client:
                yield client
            return
        ca, credentials = self.credentials(cluster, role)
        # A node's certificate names its address (a worker's, signed by trustd, little
        # else): check it against the address the machine reports.
        address = await asyncio.to_thread(self._address, uuid)
        async with node_client(
            socket, credentials=credentials, ca=ca, server_name=address or "localhost"
        ) as client:
            yield client

    async def in_maintenance(self, uuid: str) -> bool:
        """Whether the node's API is the maintenance API (its self-signed certificate)."""
        from cryptography import x509

        pem = await maintenance_certificate(await self.socket(uuid))
        cert = x509.load_pem_x509_certificate(pem.encode())
        names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        return bool(names) and names[0].value == MAINTENANCE_SERVER_NAME

    async def resource(
        self, uuid: str, cluster: str, kind: str, rid: str, *, role: Role = Role.ADMIN
    ) -> dict[str, Any]:
        async with self.client(uuid, cluster, role=role) as client:
            answer = await client.resources.Get(
                resource_pb2.ResourceGetRequest(type=kind, id=rid), timeout=15
            )
        spec: dict[str, Any] = json.loads(answer.messages[0].resource.spec_json)
        return spec

    async def peers_ready(self, peers: tuple[str, ...], cluster: str) -> str:
        """'' when every one of ``peers`` (control planes of ``cluster``) is ready; else
        why not (quorum first: a control plane reboots only while its peers are ready)."""
        for peer in peers:
            try:
                status = await self.resource(peer, cluster, "MachineStatuses", "machine")
            except Exception as exc:
                return f"control plane {peer} cannot be asked ({exc})"
            if not status.get("ready"):
                return f"control plane {peer} is not ready: its etcd member may not be healthy"
        return ""

    async def upgrade(self, uuid: str, cluster: str, bundle: Path) -> str:
        """Send ``bundle`` to the machine's Upgrade RPC through its link (a delta against
        the image it runs when both have a chunk index: docs/adr/0026); the node verifies
        it, installs the other slot and reboots into it. Its message."""
        from basalt.machinery.client.bundle_upload import plan_upload
        from basalt.machinery.client.client import upload

        async with self.client(uuid, cluster) as client:
            metadata = client.metadata([])
            plan = await plan_upload(client.machine, bundle, metadata=metadata)
            if plan.delta is not None:
                log.info("machine %s: sending %s", uuid, plan.describe())
            answer = await upload(
                client.machine.Upgrade,
                plan.requests(machine_pb2.UpgradeOptions()),
                metadata=metadata,
                timeout=600,
            )
        return str(answer.messages[0].message)

    async def rollback(self, uuid: str, cluster: str) -> str:
        async with self.client(uuid, cluster) as client:
            answer = await client.machine.Rollback(
                machine_pb2.RollbackRequest(), metadata=client.metadata([]), timeout=600
            )
        return str(answer.messages[0].message)

    async def running_config(self, uuid: str, cluster: str) -> str:
        spec = await self.resource(uuid, cluster, "MachineConfigs", "v1alpha1")
        return str(spec.get("yaml", ""))

    async def stats(self, uuid: str, cluster: str) -> dict[str, Any]:
        """The node's CPU and memory use over the last hour, as it sampled them itself
        (the spec of its SystemStats/history: ``interval``, and aligned lists ``times``,
        ``cpu``, ``memory`` oldest first, with ``memoryTotal``), read as ``os:reader``.
        A node in maintenance mode serves no resources: ask only allocated machines."""
        return await self.resource(uuid, cluster, "SystemStats", "history", role=Role.READER)


class Reconciler:
    """The clusters' controller. On the leader, ``tick`` (every election round) starts
    clusters being applied or deleted and checks drift every ``DRIFT_INTERVAL`` s."""

    def __init__(self, fleet: Fleet, replicas: Replicas | None = None) -> None:
        self.fleet = fleet
        self.replicas = replicas
        self.nodes = Nodes(fleet, replicas)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._drift_at = 0.0
        self._drift: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        return self.replicas is None or self.replicas.is_leader

    async def tick(self) -> None:
        """One round of the leader's controllers."""
        for name in await asyncio.to_thread(self._unfinished):
            task = self.tasks.get(name)
            if task is None or task.done():
                log.info("cluster %s: taking up its %s", name, "operation")
                self.start(name)
        now = time.monotonic()
        if now - self._drift_at >= DRIFT_INTERVAL and (self._drift is None or self._drift.done()):
            self._drift_at = now
            self._drift = asyncio.create_task(self._check_drift(), name="drift")

    def _unfinished(self) -> list[str]:
        from sqlalchemy import select

        with self.fleet.database.session() as session:
            rows = session.execute(
                select(Cluster.name).where(Cluster.status.in_(("applying", "deleting")))
            )
            return [str(r[0]) for r in rows]

    async def _check_drift(self) -> None:
        from sqlalchemy import select

        def ready() -> list[str]:
            with self.fleet.database.session() as session:
                rows = session.execute(select(Cluster.name).where(Cluster.status == "ready"))
                return [str(r[0]) for r in rows]

        started = time.perf_counter()
        total = 0
        for name in await asyncio.to_thread(ready):
            try:
                nodes = await self.drift(name)
            except Exception as exc:  # a cluster that cannot be read now: next round
                log.info("drift check of %s: %s", name, exc)
                continue
            total += sum(1 for n in nodes if n["changes"])
        self.fleet.metrics.drifted.set(total)
        self.fleet.metrics.controller_loop.labels("drift").observe(time.perf_counter() - started)

    # -- scheduling ------------------------------------------------------------------------
    def start(self, cluster: str) -> None:
        task = self.tasks.get(cluster)
        if task is not None and not task.done():
            task.cancel()
        self.tasks[cluster] = asyncio.create_task(self._run(cluster), name=f"cluster-{cluster}")

    async def stop(self) -> None:
        if self._drift is not None:
            self._drift.cancel()
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def wait(self, cluster: str) -> None:
        task = self.tasks.get(cluster)
        if task is not None:
            await asyncio.shield(task)

    # -- one pass --------------------------------------------------------------------------
    def _status(self, cluster: str, status: str, message: str = "") -> None:
        with self.fleet.database.session() as session:
            row = session.get(Cluster, cluster)
            if row is not None:
                row.status = status
                row.message = message
                row.updated = utcnow()

    async def _run(self, cluster: str) -> None:
        started = time.perf_counter()
        try:
            deleting = await asyncio.to_thread(self._is_deleting, cluster)
            await self._reconcile(cluster, deleting)
        except asyncio.CancelledError:
            raise
        except (BasaltError, OSError, TimeoutError) as exc:
            message = exc.one_line() if isinstance(exc, BasaltError) else f"{exc!r}"
            log.warning("cluster %s: %s", cluster, message)
            await asyncio.to_thread(self._status, cluster, "failed", message)
        except grpc.aio.AioRpcError as exc:  # a node refused: its reason, in one line
            details = " ".join((exc.details() or "").split())
            message = f"{exc.code().name}: {details}"
            log.warning("cluster %s: %s", cluster, message)
            await asyncio.to_thread(self._status, cluster, "failed", message)
        except Exception as exc:  # a bug: keep the fleet up, say where it stopped
            log.exception("cluster %s: reconcile failed", cluster)
            await asyncio.to_thread(self._status, cluster, "failed", f"internal error: {exc!r}")
        finally:
            self.fleet.metrics.controller_loop.labels("cluster").observe(
                time.perf_counter() - started
            )

    def _is_deleting(self, cluster: str) -> bool:
        with self.fleet.database.session() as session:
            row = session.get(Cluster, cluster)
            return row is not None and row.status == "deleting"

    def _members(self, cluster: str) -> list[Machine]:
        with self.fleet.database.session() as session:
            return cl.members(session, cluster)

    async def _reconcile(self, cluster: str, deleting: bool) -> None:
        members = await asyncio.to_thread(self._members, cluster)
        keep = [m for m in members if m.state == "allocated"]
        release = [m for m in members if m.state == "releasing"]
        if not deleting:
            await asyncio.to_thread(self._status, cluster, "applying", "sending configs")
            await asyncio.gather(*(self._configure(cluster, m) for m in keep))
            await self._bootstrap(cluster, keep)
            await asyncio.to_thread(self._status, cluster, "applying", "waiting for nodes")
            await asyncio.gather(*(self._ready(cluster, m) for m in keep))
        if release:
            await asyncio.to_thread(self._status, cluster, "applying", "releasing machines")
            # One at a time: a graceful reset of a control plane leaves etcd. Deleting the
            # cluster ends etcd with its last member, on purpose.
            for machine in release:
                await self._release(cluster, machine, end_etcd=deleting)
        if deleting:
            await asyncio.to_thread(self._delete_row, cluster)
            log.info("cluster %s deleted; its machines are free", cluster)
            return
        await asyncio.to_thread(self._status, cluster, "ready", "")
        log.info("cluster %s is ready (%d nodes)", cluster, len(keep))

    async def _configure(self, cluster: str, machine: Machine) -> None:
        intended = cl.intended_config(machine, self.fleet.box)
        await self.nodes.socket(machine.uuid, LINK_WAIT)
        request = machine_pb2.ApplyConfigurationRequest(
            data=intended.encode(), mode=machine_pb2.ApplyMode.AUTO
        )
        if await self.nodes.in_maintenance(machine.uuid):
            async with self.nodes.client(machine.uuid, None) as client:
                await client.machine.ApplyConfiguration(request, timeout=120)
            log.info("cluster %s: %s got its first config", cluster, machine.hostname)
            return
        running = await self.nodes.running_config(machine.uuid, cluster)
        if cl.digest(running) == cl.digest(intended):
            return
        async with self.nodes.client(machine.uuid, cluster) as client:
            answer = await client.machine.ApplyConfiguration(request, timeout=120)
        mode = machine_pb2.ApplyMode.Name(answer.messages[0].mode).lower()
        log.info("cluster %s: %s applied (mode %s)", cluster, machine.hostname, mode)

    async def _status_of(self, cluster: str, machine: Machine) -> dict[str, Any]:
        return await self.nodes.resource(machine.uuid, cluster, "MachineStatuses", "machine")

    async def _until(self, what: str, check: Any, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if await check():
                    return
            except (BasaltError, OSError, TimeoutError) as exc:
                last = exc
            except Exception as exc:  # grpc errors while a node restarts its API
                last = exc
            await asyncio.sleep(POLL)
        detail = f": {last}" if last else ""
        raise OperationError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")

    async def _bootstrap(self, cluster: str, keep: list[Machine]) -> None:
        def bootstrapped() -> bool:
            with self.fleet.database.session() as session:
                return cl.get_cluster(session, cluster).bootstrapped

        if await asyncio.to_thread(bootstrapped):
            return
        first = next((m for m in keep if m.role == cl.CONTROLPLANE), None)
        if first is None:
            return

        async def running() -> bool:
            return (await self._status_of(cluster, first)).get("stage") == "running"

        await self._until(f"{first.hostname} to run its config", running)
        async with self.nodes.client(first.uuid, cluster) as client:
            try:
                await client.machine.Bootstrap(machine_pb2.BootstrapRequest(), timeout=60)
            except Exception as exc:
                if "already" not in str(exc):
                    raise
        log.info("cluster %s: etcd bootstrapped on %s", cluster, first.hostname)

        def mark() -> None:
            with self.fleet.database.session() as session:
                cl.get_cluster(session, cluster).bootstrapped = True

        await asyncio.to_thread(mark)

    async def _ready(self, cluster: str, machine: Machine) -> None:
        async def ready() -> bool:
            return bool((await self._status_of(cluster, machine)).get("ready"))

        await self._until(f"{machine.hostname} to be ready", ready)

    async def _release(self, cluster: str, machine: Machine, end_etcd: bool = False) -> None:
        if not await self.nodes.in_maintenance(machine.uuid):
            async with self.nodes.client(machine.uuid, cluster) as client:
                await client.machine.Reset(
                    machine_pb2.ResetRequest(
                        graceful=True,
                        wipe_mode=machine_pb2.WipeMode.STATE,
                        reboot=True,
                        destroy_last_etcd_member=end_etcd,
                    ),
                    timeout=120,
                )
            log.info("cluster %s: %s is being reset", cluster, machine.hostname)

        async def back() -> bool:
            return await self.nodes.in_maintenance(machine.uuid)

        await self._until(f"{machine.hostname} to come back in maintenance mode", back)

        def free() -> None:
            with self.fleet.database.session() as session:
                row = session.get(Machine, machine.uuid)
                if row is not None:
                    row.state, row.cluster, row.role, row.machine_set = "free", None, "", ""
                    row.intended, row.intended_digest, row.allocated = None, "", None
                    inventory = dict(row.inventory or {})
                    inventory.update(stage="maintenance", configured=False, cluster="")
                    row.inventory = inventory

        await asyncio.to_thread(free)
        log.info("cluster %s: %s released; it is free", cluster, machine.hostname)

    def _delete_row(self, cluster: str) -> None:
        with self.fleet.database.session() as session:
            row = session.get(Cluster, cluster)
            if row is not None:
                session.delete(row)

    # -- drift -----------------------------------------------------------------------------
    async def drift(self, cluster: str) -> list[dict[str, Any]]:
        """Per node: the fields where what it runs differs from what the fleet intends."""
        from basalt.machinery.config.diff import config_changes

        members = await asyncio.to_thread(self._members, cluster)
        results: list[dict[str, Any]] = []

        async def one(machine: Machine) -> None:
            entry: dict[str, Any] = {
                "uuid": machine.uuid,
                "hostname": machine.hostname,
                "role": machine.role,
            }
            if machine.state != "allocated" or machine.intended is None:
                entry.update(state=machine.state, changes=[])
                results.append(entry)
                return
            try:
                running = await self.nodes.running_config(machine.uuid, cluster)
            except (BasaltError, OSError, TimeoutError) as exc:
                entry.update(error=str(exc), changes=[])
                results.append(entry)
                return
            except Exception as exc:  # the node's API refused or is restarting
                details = getattr(exc, "details", None)
                reason = details() if callable(details) else str(exc)
                entry.update(error=f"{type(exc).__name__}: {reason}", changes=[])
                results.append(entry)
                return
            intended = cl.intended_config(machine, self.fleet.box)
            changes = []
            if cl.digest(running) != cl.digest(intended):
                for change in config_changes(
                    cl.running_bundle(intended, "intended"), cl.running_bundle(running, "running")
                ):
                    changes.append(change.document + ("." + change.path if change.path else ""))
                if not changes:
                    changes = ["(formatting only)"]
            entry.update(changes=changes)
            results.append(entry)

        await asyncio.gather(*(one(m) for m in members))
        results.sort(key=lambda e: (e["role"] != cl.CONTROLPLANE, e["hostname"]))
        drifted = sum(1 for e in results if e["changes"])

        def record() -> None:
            with self.fleet.database.session() as session:
                row = session.get(Cluster, cluster)
                if row is not None:
                    row.drifted = drifted

        await asyncio.to_thread(record)
        return results

    async def kubeconfig(self, cluster: str) -> bytes:
        members = await asyncio.to_thread(self._members, cluster)
        controlplanes = [m for m in members if m.role == cl.CONTROLPLANE and m.state == "allocated"]
        if not controlplanes:
            raise OperationError(f"cluster {cluster} has no control plane")
        last: Exception | None = None
        for machine in controlplanes:
            try:
                async with self.nodes.client(machine.uuid, cluster) as client:
                    answer = await client.machine.Kubeconfig(common_pb2.Empty(), timeout=30)
                return bytes(answer.messages[0].data)
            except (APIError, NotLinked) as exc:
                last = exc
        raise OperationError(f"no control plane of {cluster} gave a kubeconfig: {last}")
