"""The Containers, Stats, Cgroups, TimeCheck and DiskUsage RPCs of MachineService
(a mixin of MachineServicer): read-only looks at the node for an operator without a
shell. containerd answers ``Containers``; ``Stats`` reads each task's cgroup; the
kernel's cgroup files answer ``Cgroups`` (:mod:`..sys.cgroups`); ``TimeCheck`` asks SNTP
servers without touching the clock; ``DiskUsage`` walks a tree (:mod:`..sys.diskusage`)
under the same path rules as ``List``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from basalt.machinery.api import common_pb2, machine_pb2
from basalt.machinery.roles import Role

from .errors import InvalidRequestError, NotFoundError, UnavailableError

if TYPE_CHECKING:
    from ..containerd.listing import ContainerSummary
    from ..node import Node
    from .auth import Principal

Context = grpc.aio.ServicerContext[Any, Any]
#: Values ``Stats`` reads from each task's cgroup.
STAT_KEYS = ("memory.current", "cpu.stat.usage_usec", "pids.current")
#: Seconds each SNTP server gets to answer.
TIME_TIMEOUT = 2.0
#: At most this many servers per TimeCheck (configured ones are few).
MAX_TIME_SERVERS = 16
_USAGE_BATCH = 256


class InspectMethods:
    node: Node

    def meta(self) -> common_pb2.Metadata:
        raise NotImplementedError

    @staticmethod
    def principal() -> Principal:
        raise NotImplementedError

    async def _check_path(self, path: str, verb: str = "") -> None:
        raise NotImplementedError

    # -- containers ---------------------------------------------------------------------------
    async def _containers(self, namespace: str) -> list[ContainerSummary]:
        from ..containerd.listing import list_containers
        from ..containerd.runtime import ContainerdUnavailable, runtime_for

        if namespace and not _valid_namespace(namespace):
            raise InvalidRequestError(
                f"{namespace!r} is not a containerd namespace name",
                hint="namespaces are like basalt or k8s.io (letters, digits, '.', '-', '_')",
            )
        runtime = runtime_for(self.node)
        try:
            client = runtime.client(timeout=15.0)
        except ContainerdUnavailable as exc:
            raise UnavailableError(
                f"containerd is not running on this node: {exc}",
                hint="see `basaltctl services` and `basaltctl logs containerd`",
            ) from None
        try:
            async with client:
                return await list_containers(client, namespace)
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(f"containerd: {exc.code().name}: {exc.details()}") from None

    async def Containers(self, request: machine_pb2.ContainersRequest, context: Context) -> Any:
        found = [
            machine_pb2.ContainerInfo(
                namespace=c.namespace,
                id=c.id,
                image=c.image,
                pid=c.pid,
                status=c.status,
                pod=c.pod,
                name=c.name,
                created=c.created,
            )
            for c in await self._containers(request.namespace)
        ]
        answer = machine_pb2.Containers(metadata=self.meta(), containers=found)
        return machine_pb2.ContainersResponse(messages=[answer])

    async def Stats(self, request: machine_pb2.StatsRequest, context: Context) -> Any:
        from ..sys.cgroups import Hierarchies, read_pid

        live = ("running", "paused", "pausing")
        running = [
            c for c in await self._containers(request.namespace) if c.pid and c.status in live
        ]

        def measure() -> list[machine_pb2.ContainerStat]:
            hierarchies = Hierarchies.current()
            stats = []
            for c in running:
                values = read_pid(hierarchies, c.pid, STAT_KEYS)
                stats.append(
                    machine_pb2.ContainerStat(
                        namespace=c.namespace,
                        id=c.id,
                        pod=c.pod,
                        name=c.name,
                        memory_usage=_number(values.get("memory.current")),
                        cpu_usage_ns=_number(values.get("cpu.stat.usage_usec")) * 1000,
                        pids=_number(values.get("pids.current")),
                    )
                )
            return sorted(stats, key=lambda s: (-s.memory_usage, s.namespace, s.id))

        stats = await asyncio.to_thread(measure)
        answer = machine_pb2.Stats(metadata=self.meta(), stats=stats)
        return machine_pb2.StatsResponse(messages=[answer])

    # -- cgroups ------------------------------------------------------------------------------
    async def Cgroups(self, request: machine_pb2.CgroupsRequest, context: Context) -> Any:
        from ..sys.cgroups import CgroupError, Hierarchies, preset_keys, walk

        try:
            keys = preset_keys(request.preset)
        except CgroupError as exc:
            raise InvalidRequestError(str(exc), hint="basaltctl cgroups --preset pids") from None

        def read() -> tuple[list[tuple[str, dict[str, str]]], bool]:
            return walk(Hierarchies.current(), keys, request.path)

        try:
            rows, truncated = await asyncio.to_thread(read)
        except CgroupError as exc:
            hint = "paths are relative to the cgroup root; see `basaltctl cgroups` for them"
            if "no cgroup" in str(exc):
                raise NotFoundError(str(exc), hint=hint) from None
            raise InvalidRequestError(str(exc), hint=hint) from None
        if truncated:
            raise InvalidRequestError(
                f"more than {len(rows)} cgroups under {request.path or 'the root'!r}",
                hint="narrow it with --path",
            )
        answer = machine_pb2.Cgroups(
            metadata=self.meta(),
            preset=request.preset or "all",
            cgroups=[machine_pb2.CgroupUsage(path=p, values=v) for p, v in rows],
        )
        return machine_pb2.CgroupsResponse(messages=[answer])

    # -- time ---------------------------------------------------------------------------------
    def _time_servers(self, requested: str) -> list[tuple[str, str, int]]:
        """(label, host, port) of each server to ask; none when the node has no time
        servers configured (the answer then carries the node's clock only, which is what
        comparing nodes' clocks needs)."""
        port = self.node.tuning.ntp_port
        if requested:
            host, port = parse_server(requested, port)
            return [(requested, host, port)]
        from basalt.machinery.config import TimeSyncConfig

        config = self.node.config.first(TimeSyncConfig) if self.node.config else None
        if config is None:
            return []  # no time servers: the answer is the node's clock alone
        return [(s, s, port) for s in list(config.servers)[:MAX_TIME_SERVERS]]

    async def TimeCheck(self, request: machine_pb2.TimeCheckRequest, context: Context) -> Any:
        from basalt.machinery import sntp

        from ..controllers.timesync import RESOURCE, RESOURCE_ID, query

        servers = self._time_servers(request.server)
        clock = self.node.platform.clock()

        async def sample(label: str, host: str, port: int) -> machine_pb2.TimeSample:
            try:
                answer = await query(host, port, clock=clock, timeout=TIME_TIMEOUT)
            except (OSError, sntp.SntpError) as exc:
                return machine_pb2.TimeSample(server=label, error=str(exc) or type(exc).__name__)
            return machine_pb2.TimeSample(
                server=label,
                offset_seconds=answer.offset,
                round_trip_seconds=answer.delay,
                stratum=answer.stratum,
            )

        node_time = clock.now()
        samples = await asyncio.gather(*(sample(*s) for s in servers))
        status = self.node.store.get(RESOURCE, RESOURCE_ID)
        synced = bool(getattr(status.spec, "synced", False)) if status else False
        answer = machine_pb2.TimeCheck(
            metadata=self.meta(), node_time=node_time, samples=samples, synced=synced
        )
        return machine_pb2.TimeCheckResponse(messages=[answer])

    # -- disk usage ---------------------------------------------------------------------------
    async def DiskUsage(
        self, request: machine_pb2.DiskUsageRequest, context: Context
    ) -> AsyncIterator[Any]:
        from .files import normalise, resolve, sensitive_filter

        if not request.paths:
            raise InvalidRequestError("no path given", hint="basaltctl usage /var")
        if request.recursion_depth < -1:
            raise InvalidRequestError(
                f"recursion depth must be -1 (no limit) or more, got {request.recursion_depth}"
            )
        root = self.node.paths.root
        admin = Role.ADMIN in self.principal().roles
        for path in request.paths:  # every path is checked before anything is walked
            await self._check_path(path)
        pseudo = await asyncio.to_thread(_pseudo_devices)
        meta = self.meta()
        for path in request.paths:
            view = normalise(path)
            host = await asyncio.to_thread(resolve, root, view)
            skip = await asyncio.to_thread(sensitive_filter, root, view, admin)
            entries = _usage_infos(
                str(host), view, request, skip=skip, pseudo=pseudo, threshold=request.threshold
            )
            while batch := await asyncio.to_thread(_take, entries, _USAGE_BATCH):
                for info in batch:
                    info.metadata.CopyFrom(meta)
                    yield info


def _usage_infos(
    host: str,
    view: str,
    request: machine_pb2.DiskUsageRequest,
    *,
    skip: Any,
    pseudo: frozenset[int],
    threshold: int,
) -> Iterator[machine_pb2.DiskUsageInfo]:
    import posixpath

    from ..sys.diskusage import usage

    for entry in usage(
        host,
        max_depth=request.recursion_depth,
        show_files=request.all,
        skip=skip,
        pseudo=pseudo,
    ):
        if not entry.error and not _passes(entry.size, threshold):
            continue
        name = view if entry.relative == "." else posixpath.join(view, entry.relative)
        yield machine_pb2.DiskUsageInfo(
            name=name, size=entry.size, relative_name=entry.relative, error=entry.error
        )


def _passes(size: int, threshold: int) -> bool:
    """Positive threshold: at least that big; negative: smaller than its magnitude."""
    if threshold > 0:
        return size >= threshold
    if threshold < 0:
        return size < -threshold
    return True


def _pseudo_devices() -> frozenset[int]:
    from ..sys.diskusage import pseudo_devices

    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return pseudo_devices(f.read())
    except OSError:
        return frozenset()


def _take(items: Iterator[machine_pb2.DiskUsageInfo], count: int) -> list[Any]:
    return list(itertools.islice(items, count))


def _number(text: str | None) -> int:
    return int(text) if text and text.isdigit() else 0


def _valid_namespace(name: str) -> bool:
    return len(name) <= 76 and all(c.isalnum() or c in ".-_" for c in name) and name[0].isalnum()


def parse_server(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address -> (host, port).

    Raises InvalidRequestError naming the text when it is not one of those.
    """
    hint = "give a host name or address, optionally with :PORT (e.g. time.example.org:123)"
    raw = text.strip()
    host, port_text = raw, ""
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidRequestError(f"time server {text!r} is not HOST[:PORT]", hint=hint)
        port_text = rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    port = default_port
    if port_text or raw.endswith(":"):
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InvalidRequestError(
                f"time server {text!r}: port {port_text!r} is not a number from 1 to 65535",
                hint=hint,
            )
        port = int(port_text)
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:%")
    if not host or len(host) > 253 or not set(host) <= allowed or host.startswith("-"):
        raise InvalidRequestError(f"time server {text!r} is not HOST[:PORT]", hint=hint)
    return host, port
