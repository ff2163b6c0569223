"""``basaltctl support``: one zip with what a support engineer asks for first, per node
and for the cluster, with every secret replaced.

Nodes are collected one after another and each item is written into the archive as it
arrives (logs stream into their entry), so memory stays bounded by the largest single
answer. An item or a node that fails is recorded in the archive's README and the rest
goes on; the command fails only when nothing at all could be collected. The machine
config (and any other sensitive resource) is read only by an ``os:admin`` client, and
written only redacted; every file is also scrubbed of the secret values in the configs
read (see :class:`._collect.Scrubber`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run
from ._common import info, options, warn

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client

    from ._collect import NodeState, SupportArchive


class _NodeAnswerError(Exception):
    """A node's answer carried an error (a forwarded call that failed on that node)."""


def support(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("-o", "--output", help="The zip to write.")] = Path(
        "support.zip"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite the output file.")] = False,
    log_lines: Annotated[
        int, typer.Option("--log-lines", help="Lines from the end of each service's log.", min=1)
    ] = 5000,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per call.", min=1)] = 30,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Collect a support bundle from nodes: versions, resources, logs, dmesg, events,
    processes, mounts, netstat, etcd, boot and upgrade history, the machine config with
    every secret replaced; per node and a cluster summary, in one zip."""
    from basalt.machinery.fileio import replacing

    from ._collect import SupportArchive
    from ._common import refuse_overwrite

    refuse_overwrite([output], force)
    roles = _client_roles(ctx)
    admin = "os:admin" in roles
    if not admin:
        info("not os:admin: the machine config and sensitive resources are left out")

    async def work(client: Client, failures: NodeFailures) -> None:
        import basalt

        with replacing(output, mode=0o600) as handle:
            archive = SupportArchive(handle)
            collector = Collector(client, archive, admin=admin, log_lines=log_lines)
            collector.timeout = timeout
            await collector.collect()
            if not archive.node_entries():
                _nothing_collected(archive)
            archive.finish(
                {
                    "collected": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "by": f"basaltctl {basalt.__version__}, roles {', '.join(roles) or 'none'}",
                    "endpoint": client.endpoint,
                    "nodes": [n.label for n in collector.nodes],
                    "log lines per service": log_lines,
                }
            )
        missing = len(archive.failures)
        info(
            f"wrote {output}: {len(archive.entries)} files"
            + (f", {missing} item(s) not collected (see README.txt)" if missing else "")
        )

    run(ctx, work, nodes=nodes, endpoints=endpoints)


def _client_roles(ctx: typer.Context) -> list[str]:
    """The roles in the context's client certificate (what the nodes will grant)."""
    from basalt.machinery.pki import certificate_organizations

    opts = options(ctx)
    _, context = opts.load_client_config().current(opts.context)
    try:
        return certificate_organizations(context.crt) if context.crt else []
    except ValueError:
        return []


def _nothing_collected(archive: SupportArchive) -> None:
    from basalt.machinery.errors import BasaltError

    first = archive.failures[0] if archive.failures else None
    detail = f": {first.where}: {first.item}: {first.error}" if first else ""
    archive.abandon()
    raise BasaltError(
        f"nothing could be collected from any node{detail}; no archive written",
        hint="check that the nodes are up and reachable ('basaltctl version -n NODE') "
        "and that -e/-n name them",
    )


def _error_text(exc: BaseException) -> str:
    import grpc.aio

    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


def _checked(message: Any) -> Any:
    """``message`` unless its per-node metadata carries an error."""
    meta = message.metadata
    if meta.error:
        import grpc

        name = next((c.name for c in grpc.StatusCode if c.value[0] == meta.code), "ERROR")
        raise _NodeAnswerError(f"{name}: {meta.error}")
    return message


def _only(answer: Any) -> Any:
    """The one node's message of a unary answer (one node is asked at a time)."""
    if not answer.messages:
        raise _NodeAnswerError("the node sent an empty answer")
    return _checked(answer.messages[0])


def _as_dict(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    data: dict[str, Any] = MessageToDict(message, preserving_proto_field_name=True)
    data.pop("metadata", None)
    return data


class Collector:
    """Asks each node for each item and writes the answers into the archive."""

    def __init__(
        self, client: Client, archive: SupportArchive, *, admin: bool, log_lines: int
    ) -> None:
        self.client = client
        self.archive = archive
        self.admin = admin
        self.log_lines = log_lines
        self.timeout = 30.0
        from ._collect import NodeState

        self.nodes = [NodeState(n, [n]) for n in client.nodes] or [NodeState(client.endpoint, [])]

    async def collect(self) -> None:
        # Versions and machine configs first: the scrubber then knows every node's
        # secrets before any log or resource of any node is written.
        for node in self.nodes:
            await self._version(node)
        for node in self._reachable():
            if self.admin:
                await self._item(node, "machine config", self._machine_config(node))
            else:
                self.archive.failed(node.label, "machine config", "skipped: os:admin only")
        for node in self._reachable():
            info(f"{node.label}: collecting")
            await self._node(node)
        await self._item(None, "cluster summary", self._summary())

    def _reachable(self) -> list[NodeState]:
        return [n for n in self.nodes if not n.unreachable]

    async def _item(self, node: NodeState | None, what: str, work: Awaitable[None]) -> bool:
        """Run one item; a failure is recorded (and shown) and the next item goes on."""
        import grpc.aio

        from basalt.machinery.errors import BasaltError

        where = node.label if node else "cluster"
        try:
            await work
        except (grpc.aio.AioRpcError, _NodeAnswerError, BasaltError, OSError) as exc:
            error = _error_text(exc)
        except Exception as exc:  # a surprise in one item must not lose the others
            error = f"{type(exc).__name__}: {exc}"
        else:
            return True
        self.archive.failed(where, what, error)
        warn(f"{where}: {what} not collected: {self.archive.scrub(error)}")
        return False

    def _md(self, node: NodeState) -> tuple[tuple[str, str], ...]:
        return self.client.metadata(node.targets)

    async def _unary(self, node: NodeState, rpc: str) -> Any:
        from basalt.machinery.api import common_pb2

        call = getattr(self.client.machine, rpc)
        return _only(await call(common_pb2.Empty(), metadata=self._md(node), timeout=self.timeout))

    async def _version(self, node: NodeState) -> None:
        async def work() -> None:
            version = _as_dict(await self._unary(node, "Version"))
            node.version = version
            self.archive.yaml(
                f"{node.directory}/version.yaml",
                "the node's Basalt version, platform, mode",
                version,
            )

        if not await self._item(node, "version", work()):
            node.unreachable = self.archive.failures[-1].error
            self.archive.failed(node.label, "everything else", "skipped: the node did not answer")

    async def _machine_config(self, node: NodeState) -> None:
        """The running config (and a staged one): the scrubber learns their secrets
        first, then they are written redacted."""
        import yaml

        from basalt.machinery.api import resource_pb2

        from ._collect import redact_sensitive_spec

        request = resource_pb2.ResourceListRequest(type="MachineConfigs")
        specs: dict[str, dict[str, Any]] = {}
        async for item in self.client.resources.List(
            request, metadata=self._md(node), timeout=self.timeout
        ):
            resource = _checked(item).resource
            specs[resource.metadata.id] = json.loads(resource.spec_json or "{}")
        for spec in specs.values():
            try:
                documents = list(yaml.safe_load_all(spec.get("yaml", "")))
            except yaml.YAMLError:
                # Not its message: it quotes the line, which may hold a secret.
                raise _NodeAnswerError("the config does not parse as YAML; not written") from None
            self.archive.scrub.arm([d for d in documents if isinstance(d, dict)])
        if not specs:
            raise _NodeAnswerError("the node has no MachineConfigs resource")
        for config_id, spec in sorted(specs.items()):
            staged = config_id != "v1alpha1"
            name = f"machineconfig-{config_id}.yaml" if staged else "machineconfig.yaml"
            what = f"the {'staged' if staged else 'running'} machine config ({config_id})"
            self.archive.text(
                f"{node.directory}/{name}",
                what + ", every secret replaced by (secret)",
                redact_sensitive_spec("MachineConfigs", spec)["yaml"],
            )

    async def _node(self, node: NodeState) -> None:
        steps: list[tuple[str, Callable[[NodeState], Awaitable[None]]]] = [
            ("resources", self._resources),
            ("boot status", self._boot_status),
            ("services and logs", self._services),
            ("dmesg", self._dmesg),
            ("events", self._events),
            ("processes", self._listing("Processes", "processes.yaml", "processes")),
            ("memory", self._listing("Memory", "memory.yaml", "memory use")),
            ("mounts", self._listing("Mounts", "mounts.yaml", "mounted filesystems and use")),
            ("netstat", self._listing("Netstat", "netstat.yaml", "TCP/UDP sockets, owners")),
        ]
        if node.controlplane:
            steps.append(("etcd", self._etcd))
        for what, step in steps:
            await self._item(node, what, step(node))

    async def _resources(self, node: NodeState) -> None:
        from basalt.machinery.api import resource_pb2

        listing = resource_pb2.ResourceListRequest(type="ResourceDefinitions")
        definitions = []
        async for item in self.client.resources.List(
            listing, metadata=self._md(node), timeout=self.timeout
        ):
            definitions.append(json.loads(_checked(item).resource.spec_json or "{}"))
        info(f"{node.label}: {len(definitions)} resource types")
        for definition in definitions:
            type_name = definition.get("type", "")
            if not type_name or type_name == "MachineConfigs":
                continue  # the config has its own file (machineconfig.yaml)
            sensitive = bool(definition.get("sensitive"))
            if sensitive and not self.admin:
                self.archive.failed(
                    node.label, f"resources {type_name}", "skipped: sensitive, os:admin only"
                )
                continue
            await self._item(
                node, f"resources {type_name}", self._resource_type(node, type_name, sensitive)
            )

    async def _resource_type(self, node: NodeState, type_name: str, sensitive: bool) -> None:
        import yaml

        from basalt.machinery.api import resource_pb2

        from ._collect import CAPTURED_TYPES, redact_sensitive_spec

        request = resource_pb2.ResourceListRequest(type=type_name)
        what = f"every {type_name} resource (as 'basaltctl get {type_name} -o yaml')"
        if sensitive:
            what += ", secrets replaced by (secret)"
        with self.archive.open_text(f"{node.directory}/resources/{type_name}.yaml", what) as out:
            async for item in self.client.resources.List(
                request, metadata=self._md(node), timeout=self.timeout
            ):
                resource = _checked(item).resource
                spec = json.loads(resource.spec_json or "{}")
                if sensitive:
                    spec = redact_sensitive_spec(type_name, spec)
                record = {"node": node.label, "metadata": _as_dict(resource.metadata)}
                record["spec"] = spec
                if type_name in CAPTURED_TYPES:
                    node.captured.setdefault(type_name, []).append(record)
                out.write("---\n" + yaml.safe_dump(record, sort_keys=False, allow_unicode=True))

    async def _boot_status(self, node: NodeState) -> None:
        boot = node.captured.get("BootStatuses", [])
        update = node.captured.get("UpdateStatuses", [])
        self.archive.yaml(
            f"{node.directory}/boot-status.yaml",
            "the A/B slot running, on trial or good, the last fallback; the updater's state",
            {
                "bootStatuses": [r["spec"] for r in boot] or "none on this node",
                "updateStatuses": [r["spec"] for r in update] or "none on this node",
            },
        )

    async def _services(self, node: NodeState) -> None:
        ids = ["machined"]
        try:
            listed = _as_dict(await self._unary(node, "ServiceList"))
            self.archive.yaml(
                f"{node.directory}/services.yaml",
                "services: state, health, restarts, recent events",
                listed,
            )
            ids += [s["id"] for s in listed.get("services", []) if s.get("id")]
        finally:
            for service_id in ids:
                await self._item(node, f"log {service_id}", self._log(node, service_id))

    async def _log(self, node: NodeState, service_id: str) -> None:
        from basalt.machinery.api import machine_pb2

        request = machine_pb2.LogsRequest(id=service_id, follow=False, tail_lines=self.log_lines)
        name = f"{node.directory}/logs/{service_id}.log"
        what = f"the last {self.log_lines} lines of {service_id}'s log"
        with self.archive.open_text(name, what) as out:
            chunks = self.client.machine.Logs(
                request, metadata=self._md(node), timeout=self.timeout
            )
            async for chunk in chunks:
                out.write(_checked(chunk).bytes)

    async def _dmesg(self, node: NodeState) -> None:
        from basalt.machinery.api import machine_pb2

        request = machine_pb2.DmesgRequest(follow=False)
        with self.archive.open_text(f"{node.directory}/dmesg.log", "the kernel log") as out:
            chunks = self.client.machine.Dmesg(
                request, metadata=self._md(node), timeout=self.timeout
            )
            async for chunk in chunks:
                out.write(_checked(chunk).bytes)

    async def _events(self, node: NodeState) -> None:
        from basalt.machinery.api import machine_pb2

        from ._collect import UPGRADE_EVENT_TYPES, event_line

        history: list[str] = []
        request = machine_pb2.EventsRequest(follow=False)
        name = f"{node.directory}/events.txt"
        what = "the node's events: ID, time (UTC), type, actor, message, fields"
        with self.archive.open_text(name, what) as out:
            events = self.client.machine.Events(
                request, metadata=self._md(node), timeout=self.timeout
            )
            async for event in events:
                line = event_line(_checked(event))
                out.write(line)
                if event.type in UPGRADE_EVENT_TYPES:
                    history.append(line)
        self.archive.text(
            f"{node.directory}/upgrade-history.txt",
            "the events of boots, fallbacks, installs and updates (from events.txt)",
            "".join(history) or "(no boot, install or update events in the node's buffer)\n",
        )

    def _listing(self, rpc: str, file: str, what: str) -> Callable[[NodeState], Awaitable[None]]:
        async def step(node: NodeState) -> None:
            data = _as_dict(await self._unary(node, rpc))
            self.archive.yaml(f"{node.directory}/{file}", what, data)

        return step

    async def _etcd(self, node: NodeState) -> None:
        async def status() -> None:
            data = _as_dict(await self._unary(node, "EtcdStatus"))
            node.etcd_leader = f"{int(data.get('leader', 0)):x}"
            self.archive.yaml(
                f"{node.directory}/etcd-status.yaml",
                "the local etcd member: id, leader, raft index and term, database size",
                data,
            )

        async def members() -> None:
            answer = await self._unary(node, "EtcdMemberList")
            found = [
                {
                    "id": f"{m.id:x}",
                    "hostname": m.hostname,
                    "peerUrls": list(m.peer_urls),
                    "clientUrls": list(m.client_urls),
                    "learner": m.is_learner,
                }
                for m in answer.members
            ]
            node.etcd_members = found
            self.archive.yaml(
                f"{node.directory}/etcd-members.yaml",
                "etcd members as this node sees them",
                found,
            )

        await self._item(node, "etcd status", status())
        await self._item(node, "etcd members", members())

    async def _summary(self) -> None:
        from ._collect import summary

        self.archive.yaml(
            "cluster/summary.yaml",
            "the cluster: nodes, versions, boot status, etcd members as each node sees them",
            summary(self.nodes),
        )
