"""The ``process`` provisioner: a whole cluster as processes on this machine, no root.

Each node gets its own loopback address (127.0.0.11, .12, ...), its own node directory
(STATE, EPHEMERAL) and a launcher that restarts machined on reboot. Nodes boot into
maintenance mode and get their configs through the insecure maintenance API — the
same path a real machine takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from basalt.machinery.api import API_PORT, TRUST_PORT, common_pb2, machine_pb2, resource_pb2
from basalt.machinery.client.client import Client
from basalt.machinery.client.config import ClientConfig, Context, parse_client_config
from basalt.machinery.config import GenerateOptions, Patch, generate_configs
from basalt.machinery.errors import BasaltError
from basalt.machinery.fileio import write_atomic
from basalt.machinery.secrets import generate_secrets

from .state import ClusterRecord, NodeRecord

DEFAULT_BASE = "127.0.0.11"
Progress = Callable[[str, str], None]


class ProvisionError(BasaltError):
    """A cluster could not be created or destroyed; says which node and why."""


@dataclass(frozen=True)
class ClusterRequest:
    name: str
    controlplanes: int = 1
    workers: int = 1
    state_dir: Path | None = None
    base_address: str = DEFAULT_BASE
    version_contract: str | None = None
    patches: tuple[Patch, ...] = ()
    controlplane_patches: tuple[Patch, ...] = ()
    worker_patches: tuple[Patch, ...] = ()
    machined_args: tuple[str, ...] = ()
    ready_timeout: float = 120.0
    #: Bootstrap etcd on the first control plane once every node runs.
    bootstrap: bool = True


def plan_nodes(request: ClusterRequest, state_dir: Path) -> list[NodeRecord]:
    if request.controlplanes < 1:
        raise ProvisionError("a cluster needs at least one control plane", hint="--controlplanes 1")
    if request.workers < 0:
        raise ProvisionError("--workers cannot be negative")
    try:
        base = ipaddress.IPv4Address(request.base_address)
    except ValueError:
        raise ProvisionError(f"{request.base_address!r} is not an IPv4 address") from None
    total = request.controlplanes + request.workers
    if not base.is_loopback or not (base + (total - 1)).is_loopback:
        raise ProvisionError(
            f"node addresses {base}..{base + (total - 1)} must stay inside 127.0.0.0/8",
            hint="the process provisioner uses loopback addresses only",
        )
    nodes = []
    for index in range(total):
        kind = "controlplane" if index < request.controlplanes else "worker"
        number = index + 1 if kind == "controlplane" else index - request.controlplanes + 1
        name = f"{request.name}-{kind}-{number}"
        nodes.append(NodeRecord(name, kind, str(base + index), str(state_dir / name)))
    return nodes


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def _launch(node: NodeRecord, extra: Sequence[str]) -> int:
    node_dir = Path(node.node_dir)
    node_dir.mkdir(parents=True, exist_ok=True)
    log = open(node_dir / "console.log", "ab")  # noqa: SIM115 (handed to the child)
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "basalt.provision.launcher",
                "--node-dir",
                str(node_dir),
                "--address",
                node.address,
                "--hostname",
                node.name,
                "--",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        log.close()
    return process.pid


async def _wait_for(what: str, check: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
        except Exception as exc:  # not up yet
            last = exc
        await asyncio.sleep(0.2)
    raise ProvisionError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f": {last}" if last else "")
    )


async def _maintenance_up(address: str) -> bool:
    client = await Client.connect(address, insecure=True)
    try:
        answer = await client.machine.Version(common_pb2.Empty(), timeout=3)
        return bool(answer.messages) and answer.messages[0].mode == "maintenance"
    finally:
        await client.close()


async def _apply(address: str, config: str) -> None:
    client = await Client.connect(address, insecure=True)
    try:
        await client.machine.ApplyConfiguration(
            machine_pb2.ApplyConfigurationRequest(data=config.encode()), timeout=30
        )
    finally:
        await client.close()


async def machine_status(context: Context, address: str) -> dict[str, object]:
    """The node's MachineStatus spec, over mTLS."""
    import json

    client = await Client.connect(address, ca=context.ca, crt=context.crt, key=context.key)
    try:
        answer = await client.resources.Get(
            resource_pb2.ResourceGetRequest(type="MachineStatuses", id="machine"), timeout=3
        )
        spec: dict[str, object] = json.loads(answer.messages[0].resource.spec_json)
        return spec
    finally:
        await client.close()


async def node_ready(context: Context, address: str) -> bool:
    """True when the node answers over mTLS and reports itself ready."""
    return bool((await machine_status(context, address)).get("ready"))


async def node_running(context: Context, address: str) -> bool:
    """True when the node booted with its config (it may still wait for etcd)."""
    return (await machine_status(context, address)).get("stage") == "running"


async def bootstrap(context: Context, address: str) -> None:
    client = await Client.connect(address, ca=context.ca, crt=context.crt, key=context.key)
    try:
        await client.machine.Bootstrap(machine_pb2.BootstrapRequest(), timeout=30)
    finally:
        await client.close()


async def members_known(context: Context, endpoint: str, names: set[str]) -> bool:
    """True when the endpoint's member list has every node in ``names``."""
    client = await Client.connect(endpoint, ca=context.ca, crt=context.crt, key=context.key)
    try:
        found = {
            item.resource.metadata.id
            async for item in client.resources.List(
                resource_pb2.ResourceListRequest(type="Members"), timeout=3
            )
        }
        return names <= found
    finally:
        await client.close()


async def create(request: ClusterRequest, state_dir: Path, progress: Progress) -> ClusterRecord:
    """Create the cluster; on failure the nodes are stopped and their logs kept."""
    if (state_dir / "cluster.json").exists():
        raise ProvisionError(
            f"a cluster already exists at {state_dir}",
            hint=f"destroy it first: basaltctl cluster destroy --name {request.name}",
        )
    nodes = plan_nodes(request, state_dir)
    for node in nodes:
        for port in (API_PORT, TRUST_PORT):
            if not _port_free(node.address, port):
                raise ProvisionError(
                    f"{node.address}:{port} is in use (another cluster, or another program)",
                    hint="destroy the other cluster or pick other addresses with --base-address",
                )
    secrets = generate_secrets()
    endpoint = f"https://{nodes[0].address}:6443"
    generated = generate_configs(
        secrets,
        GenerateOptions(
            cluster_name=request.name, endpoint=endpoint, version_contract=request.version_contract
        ),
        patches=request.patches,
        controlplane_patches=request.controlplane_patches,
        worker_patches=request.worker_patches,
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(state_dir / "secrets.yaml", secrets.to_yaml(), mode=0o600)
    configs = {
        "controlplane": generated.controlplane.to_yaml(),
        "worker": generated.worker.to_yaml(),
    }
    for kind, text in configs.items():
        write_atomic(state_dir / f"{kind}.yaml", text, mode=0o600)
    record = ClusterRecord(request.name, "process", str(state_dir), endpoint, nodes)
    record.save()
    try:
        for node in nodes:
            node.launcher_pid = _launch(node, request.machined_args)
            progress(node.name, "starting")
        record.save()
        for node in nodes:
            await _wait_for(
                f"{node.name} maintenance API", lambda n=node: _maintenance_up(n.address), 30
            )  # type: ignore[misc]
            progress(node.name, "maintenance")
        await asyncio.gather(*(_apply(n.address, configs[n.type]) for n in nodes))
        for node in nodes:
            progress(node.name, "booting")
        context = client_context(request.name, state_dir, nodes, generated_client(secrets, nodes))

        async def wait(node: NodeRecord, check: Callable[..., object], stage: str) -> None:
            await _wait_for(
                f"{node.name} to be {stage}",
                lambda: check(context, node.address),
                request.ready_timeout,
            )
            progress(node.name, stage)

        await asyncio.gather(*(wait(n, node_running, "running") for n in nodes))
        names = {n.name for n in nodes}
        await _wait_for(
            "every node in the member list",
            lambda: members_known(context, nodes[0].address, names),
            30,
        )
        if request.bootstrap:
            await bootstrap(context, nodes[0].address)
            progress(nodes[0].name, "etcd bootstrapped")
            await asyncio.gather(*(wait(n, node_ready, "ready") for n in nodes))
    except BaseException as exc:
        # Stop what was started, but keep the state: the console logs say what went wrong.
        await stop_nodes(record)
        if isinstance(exc, BasaltError):
            exc.hint = (
                f"node console logs are in {state_dir}/<node>/console.log; "
                f"clean up with 'basaltctl cluster destroy --state-dir {state_dir}'"
            )
        raise
    return record


def generated_client(secrets: object, nodes: list[NodeRecord]) -> Context:
    from basalt.machinery.client.config import issue_client_context
    from basalt.machinery.pki import CertificateAndKey

    os_ca = secrets.certs.os  # type: ignore[attr-defined]
    return issue_client_context(
        CertificateAndKey(os_ca.crt, os_ca.key), endpoints=[nodes[0].address]
    )


def client_context(
    name: str, state_dir: Path, nodes: list[NodeRecord], context: Context
) -> Context:
    """Write the cluster's own basaltconfig next to its state and return the context."""
    config = ClientConfig(context=name, contexts={name: context})
    write_atomic(state_dir / "basaltconfig", config.to_yaml(), mode=0o600)
    return context


def load_context(record: ClusterRecord) -> ClientConfig:
    path = Path(record.state_dir) / "basaltconfig"
    return parse_client_config(path.read_text(), str(path))


def _is_our_launcher(pid: int, node_dir: str) -> bool:
    """Only signal a pid that is still the launcher we started for this node."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"basalt.provision.launcher" in cmdline and node_dir.encode() in cmdline


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; reaps it when it is our own exited child (a zombie)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: the creating basaltctl has exited
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def stop_nodes(record: ClusterRecord, timeout: float = 25.0) -> list[str]:
    """SIGTERM each node's launcher (graceful shutdown), SIGKILL stragglers; returns names."""
    stopped = []
    running = [
        n for n in record.nodes if n.launcher_pid and _is_our_launcher(n.launcher_pid, n.node_dir)
    ]
    for node in running:
        os.kill(node.launcher_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(n.launcher_pid) for n in running):
        await asyncio.sleep(0.1)
    for node in running:
        if _alive(node.launcher_pid) and _is_our_launcher(node.launcher_pid, node.node_dir):
            os.killpg(node.launcher_pid, signal.SIGKILL)
        stopped.append(node.name)
    for node in record.nodes:  # services a killed machined left behind (their own sessions)
        for pid in _processes_under(node.node_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return stopped


def _processes_under(node_dir: str) -> list[int]:
    """Processes whose command line names ``node_dir`` (etcd's data dir, ...)."""
    marker = node_dir.encode() + b"/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


async def destroy(record: ClusterRecord) -> list[str]:
    stopped = await stop_nodes(record)
    shutil.rmtree(record.state_dir, ignore_errors=True)
    return stopped
