"""etcd's lifecycle on a control plane: start, bootstrap once, join, leave, membership.

The ``etcd`` service waits until this node may start etcd: its data directory holds a
member already, or ``basaltctl bootstrap`` asked this node to start a new cluster, or
another control plane runs a cluster to join. Joining adds this node as a learner,
starts etcd with the existing members, and promotes it once it has caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc.aio

from basalt.machinery.api import etcd_pb2
from basalt.machinery.config import ClusterConfig
from basalt.machinery.errors import BasaltError, ErrorKind
from basalt.machinery.pki import CertificateAndKey
from basalt.machinery.resources import AffiliateSpec

from ..runtime.store import Resource
from ..services import LogBuffer, ProcessRunner, Running
from . import admission, certs, pacing
from .client import EtcdClient, client_url, member_id_text, peer_url

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)

PROMOTE_TIMEOUT = 300.0
JOIN_TIMEOUT = 120.0
#: Per call while joining: a peer whose etcd is still starting (a learner that has not
#: caught up) may hold a call; the join moves on to the next peer instead.
JOIN_CALL_TIMEOUT = 2.0
#: How often a control plane without etcd looks for a cluster to join.
POLL = 0.25


class QuorumError(BasaltError):
    """Taking this member out would leave etcd without a healthy majority."""


class EtcdStateError(BasaltError):
    """etcd is not in a state that allows the request (not running, already bootstrapped)."""


class AlreadyBootstrappedError(BasaltError):
    """The etcd cluster exists already; bootstrap runs once per cluster."""

    kind = ErrorKind.ALREADY_EXISTS


def etcd_binary() -> str | None:
    return shutil.which("etcd")


class EtcdManager:
    """Everything etcd on one control plane; one instance per node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.data_dir = node.paths.ephemeral / "lib" / "etcd"
        self.recover_file = node.paths.ephemeral / "lib" / "etcd-recover.snapshot"
        self.bootstrap_requested = asyncio.Event()
        self.recover = False
        self.left = False
        self._certs: certs.EtcdCertificates | None = None
        self._files: certs.EtcdFiles | None = None
        #: etcd passed a health check since it last started (see etcd_service).
        self.healthy_since_start = False
        self._refusal_told: pacing.Refusal | None = None

    # -- facts ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.node.hostname

    @property
    def peer_url(self) -> str:
        return peer_url(self.node.address)

    def initialized(self) -> bool:
        return has_wal(self.data_dir)

    def _cluster(self) -> ClusterConfig:
        assert self.node.config is not None
        cluster = self.node.config.first(ClusterConfig)
        assert cluster is not None
        return cluster

    def token(self) -> str:
        return "basalt-" + hashlib.sha256(self._cluster().id.encode()).hexdigest()[:16]

    def certificates(self) -> certs.EtcdCertificates:
        if self._certs is None:
            ca = self._cluster().etcd.ca
            assert ca is not None and ca.key is not None, "control planes hold the etcd CA"
            self._certs = certs.issue(
                CertificateAndKey(ca.crt, ca.key), self.name, self.node.address
            )
            self._files = certs.write(self.node.paths.root, self._certs)
        return self._certs

    def files(self) -> certs.EtcdFiles:
        self.certificates()
        assert self._files is not None
        return self._files

    def client(self, url: str | None = None, *, timeout: float = 5.0) -> EtcdClient:
        issued = self.certificates()
        return EtcdClient(
            url or client_url(self.node.address), issued.ca, issued.client, timeout=timeout
        )

    def peer_addresses(self) -> list[str]:
        """Other control planes: the cluster endpoint's host (a control plane, known from
        the config before any member list: control planes that start together find the
        first one's etcd at once), the member list, and discovery's affiliates (a control
        plane that cannot reach the cluster endpoint finds etcd through those; etcd's
        mTLS, not the affiliate, is what a peer is trusted by)."""
        first: list[str] = []
        if self.node.config is not None:
            endpoint = urlsplit(self._cluster().control_plane.endpoint).hostname
            if endpoint and endpoint != self.node.address:
                first.append(endpoint)
        found: list[str] = []
        for member in self.node.members.values():
            if member.machine_type == "controlplane" and member.hostname != self.node.hostname:
                found.extend(a for a in member.addresses if a != self.node.address)
        found.extend(discovered_peers(self.node.store.list("Affiliates"), self.node.address))
        return first + sorted(set(found) - set(first))

    async def find_cluster(self, timeout: float = 2.0) -> list[etcd_pb2.Member] | None:
        """The member list of a running etcd cluster on another control plane, if any."""
        for address in self.peer_addresses():
            async with self.client(client_url(address), timeout=timeout) as client:
                try:
                    return await client.members()
                except grpc.aio.AioRpcError:
                    continue
        return None

    # -- starting etcd -----------------------------------------------------------------------
    def base_command(self) -> list[str]:
        files = self.files()
        address = self.node.address
        argv = [
            etcd_binary() or "etcd",
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client_url(address)}",
            f"--advertise-client-urls={client_url(address)}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--cert-file={files.server_crt}",
            f"--key-file={files.server_key}",
            f"--trusted-ca-file={files.ca}",
            "--client-cert-auth=true",
            f"--peer-cert-file={files.peer_crt}",
            f"--peer-key-file={files.peer_key}",
            f"--peer-trusted-ca-file={files.ca}",
            "--peer-client-cert-auth=true",
            f"--initial-cluster-token={self.token()}",
            # Membership changes are checked by machined instead (.admission, ADR 0024);
            # extraArgs may turn etcd's own check back on.
            "--strict-reconfig-check=false",
        ]
        argv += [f"--{k}={v}" for k, v in sorted(self._cluster().etcd.extra_args.items())]
        return argv

    async def command(self, out: LogBuffer) -> list[str]:
        """The etcd command line for this start: existing data, new cluster, or join."""
        argv = self.base_command()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.initialized():
            return argv
        if discard_incomplete(self.data_dir):
            # Left by a start that never became a member (a join whose etcd could not fetch
            # the cluster): started as is, etcd would found a one-member cluster of its own.
            self.node.events.publish(
                "etcd", "discarded the data of an etcd start that never joined", actor="etcd"
            )
        initial = f"{self.name}={self.peer_url}"
        if self.bootstrap_requested.is_set() and self.recover:
            await self._restore(initial, out)
            return argv
        if self.bootstrap_requested.is_set():
            return [*argv, f"--initial-cluster={initial}", "--initial-cluster-state=new"]
        members = await self._join()
        listed = [f"{m.name or self.name}={m.peerURLs[0]}" for m in members if m.peerURLs]
        return [*argv, f"--initial-cluster={','.join(listed)}", "--initial-cluster-state=existing"]

    async def _restore(self, initial: str, out: LogBuffer) -> None:
        etcdctl = shutil.which("etcdctl") or "etcdctl"
        process = await asyncio.create_subprocess_exec(
            etcdctl,
            "snapshot",
            "restore",
            str(self.recover_file),
            f"--name={self.name}",
            f"--initial-cluster={initial}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster-token={self.token()}",
            f"--data-dir={self.data_dir}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        )
        output, _ = await process.communicate()
        for line in output.decode(errors="replace").splitlines():
            out.append(line.encode())
        if process.returncode != 0:
            raise EtcdStateError(f"snapshot restore failed (exit {process.returncode})")
        self.recover_file.unlink(missing_ok=True)
        self.node.events.publish("etcd", "etcd restored from the uploaded snapshot", actor="etcd")

    async def _join(self) -> list[etcd_pb2.Member]:
        """Add this node as a learner through any reachable member; returns the members.

        etcd takes one learner at a time and, right after a member joined, no new one for
        a few seconds: while it refuses for such a reason this asks again on a short step
        (see :mod:`.pacing`) instead of failing the service.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + JOIN_TIMEOUT
        while loop.time() < deadline:
            refusals: list[pacing.Refusal] = []
            for address in self.peer_addresses():
                if any(r is not pacing.Refusal.OTHER for r in refusals):
                    break  # a refusal that passes by itself: ask again soon, not elsewhere
                async with self.client(client_url(address), timeout=JOIN_CALL_TIMEOUT) as client:
                    try:
                        members = await client.members()
                        if not any(self.peer_url in m.peerURLs for m in members):
                            why = admission.add_refusal(
                                members, await self.health_of(_voters(members))
                            )
                            if why is not None:  # Basalt's own check held it back
                                refusals.append(
                                    self._told(address, pacing.Refusal.VOTERS_UNHEALTHY, why)
                                )
                                continue
                            answer = await client.add_learner([self.peer_url])
                            members = list(answer.members)
                            self.node.events.publish(
                                "etcd",
                                f"joined etcd as learner {member_id_text(answer.member.ID)}",
                                actor="etcd",
                            )
                    except grpc.aio.AioRpcError as exc:
                        refusals.append(self._refused(address, exc))
                        continue
                self.node.background(self._promote_when_ready(), name="etcd-promote")
                return members
            await asyncio.sleep(pacing.join_delay(refusals))
        raise EtcdStateError("no running etcd cluster took this node as a member")

    def _refused(self, address: str, exc: grpc.aio.AioRpcError) -> pacing.Refusal:
        """Classify a failed join attempt (etcd's answer)."""
        return self._told(address, pacing.refusal(exc.details()), exc.details() or "")

    def _told(self, address: str, why: pacing.Refusal, details: str) -> pacing.Refusal:
        """Log a refused join attempt; the first of each kind in a row is an event."""
        if why is pacing.Refusal.OTHER or why is not self._refusal_told:
            log.info("etcd join through %s: %s", address, details)
        else:  # asked again every JOIN_STEP: said once, then only at debug level
            log.debug("etcd join through %s: %s", address, details)
        if why is not pacing.Refusal.OTHER and why is not self._refusal_told:
            self.node.events.publish("etcd", f"etcd join waits: {why.value}", actor="etcd")
            self._refusal_told = why
        return why

    async def _promote_when_ready(self) -> None:
        """Ask a voting member (learners cannot list members) to promote this learner,
        from a short first wait on (etcd refuses until the learner is in sync)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROMOTE_TIMEOUT
        attempt = 0
        while loop.time() < deadline:
            await asyncio.sleep(pacing.promote_delay(attempt))
            attempt += 1
            for address in self.peer_addresses():
                async with self.client(client_url(address), timeout=JOIN_CALL_TIMEOUT) as client:
                    try:
                        members = await client.members()
                        me = self._own(members)
                        if me is None or not me.isLearner:
                            return
                        health = await self.health_of(_voters(members))
                        why = admission.promote_refusal(members, me.ID, health)
                        if why is not None:
                            log.debug("promotion not yet: %s", why)
                            break
                        await client.promote(me.ID)
                    except grpc.aio.AioRpcError as exc:
                        log.debug("promotion via %s not possible yet: %s", address, exc.details())
                        continue
                self.node.events.publish("etcd", "promoted to a voting etcd member", actor="etcd")
                return

    async def _me(self, client: EtcdClient) -> etcd_pb2.Member | None:
        return self._own(await client.members())

    def _own(self, members: Iterable[etcd_pb2.Member]) -> etcd_pb2.Member | None:
        return next((m for m in members if self.peer_url in m.peerURLs), None)

    # -- requests ------------------------------------------------------------------------------
    async def bootstrap(self, recover: bool) -> str:
        running = self.initialized() or self.bootstrap_requested.is_set()
        existing = await self.find_cluster() if not running else None
        if running or existing is not None:
            names = await self._member_names(existing)
            raise AlreadyBootstrappedError(
                f"cluster already bootstrapped, members: {names}",
                hint="other control planes join by themselves; use 'basaltctl etcd members'",
            )
        if recover and not (self.recover_file.is_file() and self.recover_file.stat().st_size):
            raise EtcdStateError(
                "no snapshot was uploaded to recover from",
                hint="use 'basaltctl bootstrap --recover-from FILE'",
            )
        self.recover = recover
        self.left = False
        self.bootstrap_requested.set()
        what = "from the uploaded snapshot" if recover else "as a new cluster"
        self.node.events.publish("etcd", f"bootstrap requested ({what})", actor="etcd")
        return f"etcd bootstrap started {what} on {self.name}"

    async def _member_names(self, members: Sequence[etcd_pb2.Member] | None) -> str:
        if members is None:
            try:
                async with self.client(timeout=2.0) as client:
                    members = await client.members()
            except grpc.aio.AioRpcError:
                return f"{self.name} (starting)"
        return ", ".join(m.name or member_id_text(m.ID) for m in members) or "(none)"

    async def save_recover_snapshot(self, chunks: list[bytes]) -> int:
        if self.initialized():
            raise AlreadyBootstrappedError(
                "etcd on this node has data already; recovery needs a fresh control plane",
                hint="reset the node (basaltctl reset --wipe-mode ephemeral) first",
            )
        from basalt.machinery.fileio import write_atomic

        data = b"".join(chunks)
        if not data:
            raise EtcdStateError("the uploaded snapshot is empty")
        await asyncio.to_thread(write_atomic, self.recover_file, data, mode=0o600)
        return len(data)

    def running(self) -> bool:
        try:
            return str(self.node.supervisor.status("etcd").state) == "running"
        except BasaltError:
            return False

    def require_running(self) -> None:
        if not self.running():
            raise EtcdStateError(
                "etcd is not running on this node",
                hint="bootstrap the cluster first (basaltctl bootstrap -n CONTROL_PLANE)",
            )

    async def health_of(self, members: Sequence[etcd_pb2.Member]) -> dict[int, str]:
        """member id -> "healthy" or the reason it is not."""

        async def probe(member: etcd_pb2.Member) -> tuple[int, str]:
            if not member.clientURLs:
                return member.ID, "not started"
            async with self.client(member.clientURLs[0], timeout=2.0) as client:
                try:
                    status = await client.status()
                except grpc.aio.AioRpcError as exc:
                    return member.ID, f"unreachable ({exc.code().name})"
            return member.ID, "healthy" if not status.errors else "; ".join(status.errors)

        return dict(await asyncio.gather(*(probe(m) for m in members)))

    async def check_leave(self, force: bool, destroy_last_member: bool = False) -> None:
        """Refuse (QuorumError) when this member leaving would cost quorum (unless
        ``force``) or end the cluster as its last member (unless ``destroy_last_member``:
        ``force`` never skips that check)."""
        if not self.running():
            return
        async with self.client() as client:
            members = await client.members()
        me = next((m for m in members if self.peer_url in m.peerURLs), None)
        if me is None or me.isLearner:
            return
        voters = [m for m in members if not m.isLearner]
        others = [m for m in voters if m.ID != me.ID]
        health = await self.health_of(others)
        healthy = sum(1 for m in others if health[m.ID] == "healthy")
        needed = admission.majority(len(others))
        report = ", ".join(f"{m.name or member_id_text(m.ID)}: {health[m.ID]}" for m in others)
        if not others:
            if destroy_last_member:
                return
            raise QuorumError(
                f"{self.name} is the last etcd member: leaving ends the etcd cluster and "
                "deletes its data (--force does not skip this check)",
                hint="take a snapshot first (basaltctl etcd snapshot); to end the cluster on "
                "purpose, an os:admin passes --destroy-last-member",
            )
        if healthy < needed and not force:
            raise QuorumError(
                f"leaving would cost etcd quorum: {healthy} of {len(others)} remaining members "
                f"healthy, {needed} needed ({report})",
                hint="fix the unhealthy members first, or pass --force",
            )

    async def leave(self, force: bool, destroy_last_member: bool = False) -> str:
        self.require_running()
        await self.check_leave(force, destroy_last_member)
        async with self.client() as client:
            me = await self._me(client)
            if me is None:
                raise EtcdStateError("this node is not an etcd member")
            status = await client.status()
            voters = [m for m in await client.members() if not m.isLearner]
            if voters == [me]:
                # etcd cannot remove its last member: stopping it and wiping the data is
                # the end of the cluster (only with destroy_last_member, see check_leave).
                log.warning("%s is the last etcd member; the cluster ends with it", self.name)
            else:
                if status.leader == me.ID:
                    await self._hand_over(client, me.ID)
                await self._remove_self(client, voters, me.ID)
        self.left = True
        await self.node.supervisor.stop("etcd")
        await asyncio.to_thread(shutil.rmtree, self.data_dir, True)
        self.node.events.publish("etcd", f"{self.name} left the etcd cluster", actor="etcd")
        return f"{self.name} left the etcd cluster"

    async def _remove_self(
        self, client: EtcdClient, voters: Sequence[etcd_pb2.Member], own_id: int
    ) -> None:
        """Remove this member through another healthy voter: a member asked to remove
        itself stops its server as the removal applies, and may answer the call with
        "server stopped" instead of its result. Its own endpoint only when no other
        voter answers (force)."""
        others = [m for m in voters if own_id != m.ID]
        health = await self.health_of(others)
        for member in others:
            if health[member.ID] == "healthy":
                async with self.client(member.clientURLs[0]) as peer:
                    await _remove(peer, own_id)
                return
        await _remove(client, own_id)

    async def _hand_over(self, client: EtcdClient, own_id: int) -> str | None:
        members = await client.members()
        candidates = [m for m in members if not m.isLearner and own_id != m.ID]
        health = await self.health_of(candidates)
        for member in candidates:
            if health[member.ID] == "healthy":
                await client.move_leader(member.ID)
                return member.name or member_id_text(member.ID)
        return None

    async def forfeit_leadership(self) -> str:
        self.require_running()
        async with self.client() as client:
            me = await self._me(client)
            status = await client.status()
            if me is None or status.leader != me.ID:
                return f"{self.name} is not the etcd leader; nothing to do"
            new = await self._hand_over(client, me.ID)
        if new is None:
            raise EtcdStateError("no healthy member to hand leadership to")
        self.node.events.publish("etcd", f"leadership moved to {new}", actor="etcd")
        return f"leadership moved from {self.name} to {new}"

    async def remove_member(self, wanted: str) -> str:
        self.require_running()
        async with self.client() as client:
            members = await client.members()
            target = _pick(members, wanted)
            if self.peer_url in target.peerURLs:
                raise EtcdStateError(
                    "this node cannot remove itself", hint="use 'basaltctl etcd leave' on it"
                )
            why = admission.remove_refusal(
                members, target.ID, await self.health_of(_voters(members))
            )
            if why is not None:
                raise QuorumError(
                    why, hint="fix the unhealthy members first (basaltctl etcd status)"
                )
            await _remove(client, target.ID)
        name = target.name or member_id_text(target.ID)
        self.node.events.publish("etcd", f"removed etcd member {name}", actor="etcd")
        return f"removed etcd member {name} ({member_id_text(target.ID)})"


#: With its strict reconfiguration check turned back on (extraArgs), etcd refuses
#: membership changes until every member has been connected for a few seconds
#: ("unhealthy cluster"); a change right after a member restarted waits that out.
RECONFIG_WAIT = 20.0


async def _remove(client: EtcdClient, member_id: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECONFIG_WAIT
    while True:
        try:
            await client.remove(member_id)
            return
        except grpc.aio.AioRpcError as exc:
            if "unhealthy cluster" not in (exc.details() or "") or loop.time() > deadline:
                raise
            await asyncio.sleep(0.5)


def _voters(members: Iterable[etcd_pb2.Member]) -> list[etcd_pb2.Member]:
    return [m for m in members if not m.isLearner]


def _pick(members: Sequence[etcd_pb2.Member], wanted: str) -> etcd_pb2.Member:
    from basalt.machinery.errors import NotFoundError

    key = wanted.lower().removeprefix("0x")
    for member in members:
        ids = {member_id_text(member.ID), str(member.ID), f"{member.ID:x}"}
        if key in ids or wanted == member.name:
            return member
    names = ", ".join(f"{m.name}={member_id_text(m.ID)}" for m in members)
    raise NotFoundError(f"no etcd member {wanted!r} (members: {names})")


class EtcdRunner:
    """Starts etcd with the command line this start needs (see EtcdManager.command)."""

    def __init__(self, manager: EtcdManager) -> None:
        self.manager = manager

    async def start(self, log: LogBuffer) -> Running:
        self.manager.healthy_since_start = False
        argv = await self.manager.command(log)
        return await ProcessRunner(argv, stop_timeout=15.0).start(log)


class EtcdStartable:
    """Service condition: etcd may start (data here, bootstrap asked, or a cluster to join)."""

    description = "etcd bootstrapped here ('basaltctl bootstrap') or an etcd cluster to join"

    def __init__(self, manager: EtcdManager) -> None:
        self.manager = manager

    async def wait(self) -> None:
        manager = self.manager
        while True:
            if not manager.left:
                if manager.initialized() or manager.bootstrap_requested.is_set():
                    return
                if await manager.find_cluster(timeout=1.0) is not None:
                    return
            if manager.bootstrap_requested.is_set():
                await asyncio.sleep(POLL)
                continue
            # A bootstrap request starts etcd at once, not at the next look for a cluster.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(manager.bootstrap_requested.wait(), POLL)


def discovered_peers(affiliates: Iterable[Resource], own_address: str) -> list[str]:
    """The hosts of the etcd peer URLs that control-plane affiliates publish, but ours."""
    found = []
    for resource in affiliates:
        spec = resource.spec
        if isinstance(spec, AffiliateSpec) and spec.machine_type == "controlplane":
            host = urlsplit(spec.etcd_peer_url).hostname if spec.etcd_peer_url else None
            if host and host != own_address:
                found.append(host)
    return found


def has_wal(data_dir: Path) -> bool:
    """Whether etcd ever started as a member here: it writes its write-ahead log only once
    it has a cluster (new, restored, or fetched from the peers it joins)."""
    return any((data_dir / "member" / "wal").glob("*.wal"))


def discard_incomplete(data_dir: Path) -> bool:
    """Remove a data dir that holds no WAL (nothing in it is data); True if one was there."""
    if has_wal(data_dir) or not data_dir.exists():
        return False
    shutil.rmtree(data_dir)
    return True


def data_dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def manager_of(node: Node) -> EtcdManager | None:
    """The node's etcd manager: on a control plane once its services are registered,
    else None. (The node holds it as the narrow :class:`~basalt.machined.ports.EtcdMember`;
    the parts above etcd that need its client come here.)"""
    found = node.etcd
    if found is None:
        return None
    assert isinstance(found, EtcdManager), f"node.etcd is a {type(found).__name__}"
    return found
