"""MachineService: the node-side implementation of every machine RPC."""

from __future__ import annotations

import asyncio
import os
import platform
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from basalt.machinery.api import common_pb2, machine_pb2, machine_pb2_grpc
from basalt.machinery.roles import CLIENT_ROLES, Role

from .auth import Principal, answer_metadata, current_principal
from .cluster_health import ClusterHealthMethods
from .containers import ContainerMethods
from .errors import AccessDeniedError, InvalidRequestError, NotFoundError
from .etcd import EtcdMethods
from .graph import GraphMethods
from .inspect import InspectMethods
from .meta import MetaMethods
from .pcap import CaptureMethods
from .upgrade import UpgradeMethods

if TYPE_CHECKING:
    from ..node import Node

Context = grpc.aio.ServicerContext[Any, Any]
CHUNK = 64 * 1024
AGENT_LOG = "machined"


class MachineServicer(
    EtcdMethods,
    UpgradeMethods,
    ContainerMethods,
    InspectMethods,
    CaptureMethods,
    MetaMethods,
    GraphMethods,
    ClusterHealthMethods,
    machine_pb2_grpc.MachineServiceServicer,
):
    def __init__(self, node: Node, *, maintenance: bool = False) -> None:
        self.node = node
        #: Served by the maintenance server (no client certificates): decided by the
        #: server this servicer runs in, never by the node's state, which changes under it.
        self.maintenance = maintenance
        #: First configs arrive one at a time (the second is refused, not applied twice).
        self._first_config = asyncio.Lock()

    # -- helpers ------------------------------------------------------------------------------
    def meta(self) -> common_pb2.Metadata:
        return answer_metadata(self.node.address)

    def action(self, message: str) -> common_pb2.ActionResponse:
        return common_pb2.ActionResponse(
            messages=[common_pb2.Action(metadata=self.meta(), message=message)]
        )

    @staticmethod
    def principal() -> Principal:
        return current_principal.get()

    # -- version and config --------------------------------------------------------------------
    async def Version(self, request: common_pb2.Empty, context: Context) -> Any:
        node = self.node
        machine = node.machine
        info = machine_pb2.VersionInfo(
            metadata=self.meta(),
            tag=node.version,
            python=platform.python_version(),
            platform=str(node.platform.mode),
            arch=node.platform.arch,
            mode="maintenance" if node.maintenance else "normal",
            machine_type=machine.type if machine else "",
            hostname=node.hostname,
            schematic=_schematic_id(node),
        )
        return machine_pb2.VersionResponse(messages=[info])

    async def ApplyConfiguration(
        self, request: machine_pb2.ApplyConfigurationRequest, context: Context
    ) -> Any:
        from ..apply import ApplyRequest, apply_maintenance

        apply_request = ApplyRequest(
            data=request.data,
            mode=request.mode,
            dry_run=request.dry_run,
            try_timeout=float(request.try_timeout_seconds),
            allow_identity_change=request.allow_identity_change,
        )
        if self.maintenance:
            async with self._first_config:
                result = await apply_maintenance(self.node, apply_request)
        else:
            holder = _Holder(apply_request)
            await self.node.sequencer.start("apply-config", holder)
            result = holder.result
            if result.then_reboot:
                self.node.sequencer.start("reboot")
        answer = machine_pb2.ApplyConfiguration(
            metadata=self.meta(),
            warnings=result.warnings,
            mode=result.mode,
            mode_details=result.details,
            diff=result.diff,
        )
        return machine_pb2.ApplyConfigurationResponse(messages=[answer])

    # -- lifecycle ------------------------------------------------------------------------------
    async def Reboot(self, request: machine_pb2.RebootRequest, context: Context) -> Any:
        self.node.sequencer.start("reboot")
        return self.action("reboot started")

    async def Shutdown(self, request: machine_pb2.ShutdownRequest, context: Context) -> Any:
        self.node.sequencer.start("shutdown")
        return self.action("shutdown started")

    async def Reset(self, request: machine_pb2.ResetRequest, context: Context) -> Any:
        from ..sequencer.sequences import ResetRequest

        what = machine_pb2.WipeMode.Name(request.wipe_mode).lower()
        if request.graceful and self.node.etcd is not None:
            # refuse before acting
            await self._call(
                self.node.etcd.check_leave(request.force, request.destroy_last_etcd_member)
            )
        self.node.sequencer.start(
            "reset",
            ResetRequest(
                request.graceful,
                request.wipe_mode,
                request.reboot,
                request.force,
                request.destroy_last_etcd_member,
            ),
        )
        then = "reboot" if request.reboot else "shut down"
        return self.action(f"reset started (wipe {what}, then {then})")

    # -- services -------------------------------------------------------------------------------
    async def ServiceList(self, request: common_pb2.Empty, context: Context) -> Any:
        services = []
        for status in self.node.supervisor.statuses():
            services.append(
                machine_pb2.ServiceInfo(
                    id=status.id,
                    state=str(status.state),
                    health=str(status.health),
                    message=status.message,
                    pid=status.pid or 0,
                    restarts=status.restarts,
                    events=[
                        machine_pb2.ServiceEvent(
                            state=str(e.state), message=e.message, timestamp=e.timestamp
                        )
                        for e in status.events
                    ],
                )
            )
        return machine_pb2.ServiceListResponse(
            messages=[machine_pb2.ServiceList(metadata=self.meta(), services=services)]
        )

    async def ServiceAction(
        self, request: machine_pb2.ServiceActionRequest, context: Context
    ) -> Any:
        supervisor = self.node.supervisor
        supervisor.status(request.id)  # raises UnknownServiceError -> NOT_FOUND
        if request.id == "apid" and request.action != machine_pb2.START:
            raise InvalidRequestError(
                "apid serves this request; stopping or restarting it through itself is refused",
                hint="reboot the node instead",
            )
        kind = machine_pb2.ServiceActionKind.Name(request.action).lower()
        operation = {
            "start": supervisor.start,
            "stop": supervisor.stop,
            "restart": supervisor.restart,
        }[kind]
        await operation(request.id)
        return self.action(f"service {request.id}: {kind} requested")

    async def Logs(self, request: machine_pb2.LogsRequest, context: Context) -> AsyncIterator[Any]:
        buffer = (
            self.node.agent_log
            if request.id == AGENT_LOG
            else _container_log(self.node, request.id) or self.node.supervisor.logs(request.id)
        )
        tail = None if request.tail_lines < 0 else request.tail_lines
        meta = self.meta()
        if request.follow:
            async for line in buffer.follow(tail):
                yield common_pb2.Data(metadata=meta, bytes=line + b"\n")
        else:
            for line in buffer.lines(tail):
                yield common_pb2.Data(metadata=meta, bytes=line + b"\n")

    async def Dmesg(
        self, request: machine_pb2.DmesgRequest, context: Context
    ) -> AsyncIterator[Any]:
        from ..sys.kmsg import read_kmsg

        meta = self.meta()
        async for line in read_kmsg(follow=request.follow, tail=request.tail):
            yield common_pb2.Data(metadata=meta, bytes=line + b"\n")

    async def Events(
        self, request: machine_pb2.EventsRequest, context: Context
    ) -> AsyncIterator[Any]:
        meta = self.meta()
        since_id = request.since_id or None
        if since_id is not None and not since_id.isdigit():
            raise InvalidRequestError(
                f"{since_id!r} is not an event id",
                hint="event ids are the numbers in the ID column",
            )
        since_seconds = request.since_seconds or None
        tail = request.tail_events or None
        source = (
            self.node.events.follow(since_id=since_id, since_seconds=since_seconds, tail=tail)
            if request.follow
            else _aiter(
                self.node.events.history(since_id=since_id, since_seconds=since_seconds, tail=tail)
            )
        )
        async for event in source:
            yield machine_pb2.Event(
                metadata=meta,
                id=event.id,
                type=event.type,
                timestamp=event.timestamp,
                actor=event.actor,
                message=event.message,
                fields=event.fields,
            )

    # -- files ----------------------------------------------------------------------------------
    async def _check_path(self, path: str, verb: str = "") -> None:
        """NotFound / AccessDenied for bad paths; sensitive paths need os:admin, and an
        admin's read of one (``verb``: read, copy) is recorded as an event."""
        from .files import SENSITIVE_PREFIXES, is_sensitive, resolve

        root = self.node.paths.root
        view = path or "/"
        await asyncio.to_thread(resolve, root, view)
        sensitive = await asyncio.to_thread(is_sensitive, root, view)
        principal = self.principal()
        if sensitive and Role.ADMIN not in principal.roles:
            raise AccessDeniedError(
                f"{path} holds secrets (the machine config, keys); only os:admin may read it"
            )
        below = f"{view.rstrip('/')}/"
        holds_secrets = sensitive or any(p.startswith(below) for p in SENSITIVE_PREFIXES)
        if verb and holds_secrets and Role.ADMIN in principal.roles:
            self.node.events.publish(
                "secrets",
                f"{verb} of {view} with its secrets",
                actor="apid",
                subject=principal.subject or "(unknown)",
            )

    async def List(self, request: machine_pb2.ListRequest, context: Context) -> AsyncIterator[Any]:
        from .files import list_files

        await self._check_path(request.root)
        meta = self.meta()
        async for info in list_files(
            self.node.paths.root,
            request.root or "/",
            recurse=request.recurse,
            max_depth=request.max_depth,
            include_sensitive=Role.ADMIN in self.principal().roles,
        ):
            info.metadata.CopyFrom(meta)
            yield info

    async def Read(self, request: machine_pb2.ReadRequest, context: Context) -> AsyncIterator[Any]:
        from .files import read_file

        await self._check_path(request.path, "read")
        meta = self.meta()
        async for chunk in read_file(self.node.paths.root, request.path):
            yield common_pb2.Data(metadata=meta, bytes=chunk)

    async def Copy(self, request: machine_pb2.CopyRequest, context: Context) -> AsyncIterator[Any]:
        from .files import copy_tree

        await self._check_path(request.root_path, "copy")
        meta = self.meta()
        admin = Role.ADMIN in self.principal().roles
        async for chunk in copy_tree(
            self.node.paths.root, request.root_path, include_sensitive=admin
        ):
            yield common_pb2.Data(metadata=meta, bytes=chunk)

    # -- system information --------------------------------------------------------------------
    async def Processes(self, request: common_pb2.Empty, context: Context) -> Any:
        from . import sysinfo

        tree = await asyncio.to_thread(sysinfo.process_tree, os.getpid())
        found = await asyncio.to_thread(sysinfo.processes, tree)
        return machine_pb2.ProcessesResponse(
            messages=[machine_pb2.Processes(metadata=self.meta(), processes=found)]
        )

    async def Memory(self, request: common_pb2.Empty, context: Context) -> Any:
        from . import sysinfo

        memory = await asyncio.to_thread(sysinfo.memory, os.getpid())
        memory.metadata.CopyFrom(self.meta())
        return machine_pb2.MemoryResponse(messages=[memory])

    async def Mounts(self, request: common_pb2.Empty, context: Context) -> Any:
        from . import sysinfo

        stats = await asyncio.to_thread(sysinfo.mounts)
        return machine_pb2.MountsResponse(
            messages=[machine_pb2.Mounts(metadata=self.meta(), stats=stats)]
        )

    async def Netstat(self, request: common_pb2.Empty, context: Context) -> Any:
        from . import sysinfo

        tree = await asyncio.to_thread(sysinfo.process_tree, os.getpid())
        found = await asyncio.to_thread(sysinfo.connections, self.node.address, tree)
        return machine_pb2.NetstatResponse(
            messages=[machine_pb2.Netstat(metadata=self.meta(), connections=found)]
        )

    async def Disks(self, request: common_pb2.Empty, context: Context) -> Any:
        from . import sysinfo

        disks = await asyncio.to_thread(sysinfo.disks)
        return machine_pb2.DisksResponse(
            messages=[machine_pb2.Disks(metadata=self.meta(), disks=disks)]
        )

    async def Health(self, request: common_pb2.Empty, context: Context) -> Any:
        from ..health import run_checks

        checks = await run_checks(self.node)
        health = machine_pb2.Health(
            metadata=self.meta(),
            healthy=all(c.ok for c in checks),
            checks=[
                machine_pb2.HealthCheck(name=c.name, ok=c.ok, message=c.message) for c in checks
            ],
        )
        return machine_pb2.HealthResponse(messages=[health])

    async def GenerateClientConfiguration(
        self, request: machine_pb2.GenerateClientConfigurationRequest, context: Context
    ) -> Any:
        import datetime as dt

        from basalt.machinery.client.config import ClientConfig, issue_client_context
        from basalt.machinery.pki import CertificateAndKey

        machine = self.node.machine
        if machine is None or machine.ca.key is None:
            raise InvalidRequestError(
                "only control planes hold the OS CA key that client certificates need",
                hint="send this request to a control plane",
            )
        allowed = {r.value: r for r in CLIENT_ROLES}
        unknown = [r for r in request.roles if r not in allowed]
        if unknown or not request.roles:
            raise InvalidRequestError(
                f"unknown or missing roles: {', '.join(unknown) or '(none)'}",
                hint=f"choose from {', '.join(allowed)}",
            )
        ttl = dt.timedelta(seconds=request.ttl_seconds or 365 * 24 * 3600)
        context_name = request.context or "basalt"
        issued = issue_client_context(
            CertificateAndKey(machine.ca.crt, machine.ca.key),
            endpoints=[self.node.address],
            roles=[allowed[r] for r in request.roles],
            validity=ttl,
        )
        config = ClientConfig(context=context_name, contexts={context_name: issued})
        self.node.events.publish(
            "config",
            f"client configuration issued with roles {', '.join(request.roles)}",
            actor="apid",
            subject=self.principal().subject or "(unknown)",
        )
        answer = machine_pb2.GenerateClientConfiguration(
            metadata=self.meta(),
            ca=issued.ca.encode(),
            crt=issued.crt.encode(),
            key=issued.key.encode(),
            basaltconfig=config.to_yaml().encode(),
        )
        return machine_pb2.GenerateClientConfigurationResponse(messages=[answer])

    # -- Kubernetes -----------------------------------------------------------------------------
    async def Kubeconfig(self, request: common_pb2.Empty, context: Context) -> Any:
        """The cluster admin's kubeconfig, as this control plane rendered it."""
        from basalt.machinery.kubernetes import paths

        from .errors import UnavailableError

        if not self.node.is_controlplane:
            raise InvalidRequestError(
                "only control planes hold the Kubernetes CA key that the admin kubeconfig needs",
                hint="send this request to a control plane (-n CONTROL_PLANE)",
            )
        path = self.node.paths.root / paths.ADMIN_KUBECONFIG.lstrip("/")
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise UnavailableError(
                "the admin kubeconfig is not rendered yet",
                hint="see 'basaltctl get kubernetesassets' and 'basaltctl events'; retry shortly",
            ) from None
        self.node.events.publish(
            "kubernetes",
            "admin kubeconfig handed out",
            actor="apid",
            subject=self.principal().subject or "(unknown)",
        )
        return machine_pb2.KubeconfigResponse(
            messages=[machine_pb2.Kubeconfig(metadata=self.meta(), data=data)]
        )


class _Holder:
    def __init__(self, apply: Any) -> None:
        self.apply = apply
        self.result: Any = None


async def _aiter(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


__all__ = ["MachineServicer", "NotFoundError"]


def _container_log(node: Node, log_id: str) -> Any:
    """The log of a container run (``containers/<id>``), if this node kept it."""
    if not log_id.startswith("containers/"):
        return None
    from ..containerd.runtime import runtime_for

    found = runtime_for(node).log(log_id)
    if found is None:
        raise NotFoundError(
            f"no log {log_id!r} on this node (the last container runs' logs are kept)"
        )
    return found


def _schematic_id(node: Node) -> str:
    """The image's schematic id, as the Versions resource has it (read from the image
    before the version controller first ran)."""
    found = node.store.get("Versions", "version")
    if found is not None:
        return str(getattr(found.spec, "schematic", ""))
    from ..extensions import schematic_record

    return str(schematic_record(node.platform.system_root).get("id", ""))
