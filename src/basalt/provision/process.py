"""The ``process`` provisioner: a whole cluster as processes on this machine, no root.

Each node gets its own loopback address (127.0.0.11, .12, ...), its own node directory
(STATE, EPHEMERAL) and a launcher that restarts machined on reboot. Nodes boot into
maintenance mode and get their configs through the insecure maintenance API — the
same path a real machine takes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from basalt.machinery.api import API_PORT, TRUST_PORT
from basalt.machinery.config import GenerateOptions, Patch, generate_configs
from basalt.machinery.config.secrets import generate_secrets

from . import common
from .common import (
    DEFAULT_BASE,
    BringUp,
    Progress,
    ProvisionError,
    alive,
    bootstrap,
    client_context,
    generated_client,
    load_context,
    machine_status,
    members_known,
    node_ready,
    node_running,
    write_cluster_inputs,
)
from .state import ClusterRecord, NodeRecord

__all__ = [
    "DEFAULT_BASE",
    "ClusterRequest",
    "Progress",
    "ProvisionError",
    "bootstrap",
    "client_context",
    "create",
    "create_machines",
    "destroy",
    "generated_client",
    "is_ours",
    "load_context",
    "machine_running",
    "machine_status",
    "members_known",
    "node_ready",
    "node_running",
    "plan_nodes",
    "stop_nodes",
]


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
    return common.plan_nodes(
        request.name,
        request.controlplanes,
        request.workers,
        request.base_address,
        state_dir,
        what="process",
    )


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


async def create(request: ClusterRequest, state_dir: Path, progress: Progress) -> ClusterRecord:
    """Create the cluster; on failure the nodes are stopped and their logs kept."""
    if (state_dir / "cluster.json").exists():
        raise ProvisionError(
            f"a cluster already exists at {state_dir}",
            hint=f"destroy it first: basaltctl cluster destroy --name {request.name}",
        )
    nodes = plan_nodes(request, state_dir)
    common.check_ports_free(
        nodes,
        (API_PORT, TRUST_PORT),
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
    configs = write_cluster_inputs(state_dir, secrets, generated)
    record = ClusterRecord(request.name, "process", str(state_dir), endpoint, nodes)
    record.save()
    async with common.stopped_on_failure(lambda: stop_nodes(record), state_dir):
        for node in nodes:
            node.launcher_pid = _launch(node, request.machined_args)
            progress(node.name, "starting")
        record.save()
        context = client_context(request.name, state_dir, nodes, generated_client(secrets, nodes))
        await common.bring_up(
            nodes,
            {n.name: configs[n.type] for n in nodes},
            context,
            progress,
            BringUp(ready_timeout=request.ready_timeout, bootstrap=request.bootstrap),
        )
    return record


async def create_machines(
    name: str,
    count: int,
    state_dir: Path,
    progress: Progress,
    *,
    base_address: str = DEFAULT_BASE,
    machined_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> ClusterRecord:
    """Start ``count`` machines that stay in maintenance mode (no config): a pool for a
    fleet to enrol (``machined_args``: ``--fleet URL``) and build clusters from."""
    if (state_dir / "cluster.json").exists():
        raise ProvisionError(
            f"machines or a cluster already exist at {state_dir}",
            hint=f"destroy them first: basaltctl cluster destroy --name {name}",
        )
    if count < 1:
        raise ProvisionError("--count must be at least 1")
    # plan_nodes checks the addresses stay on loopback; machines have no role yet.
    planned = common.plan_nodes(name, 1, count - 1, base_address, state_dir, what="process")
    nodes = [
        NodeRecord(
            f"{name}-machine-{i}", "machine", n.address, str(state_dir / f"{name}-machine-{i}")
        )
        for i, n in enumerate(planned, 1)
    ]
    common.check_ports_free(
        nodes,
        (API_PORT, TRUST_PORT),
        hint="destroy the other cluster or pick other addresses with --base-address",
    )
    record = ClusterRecord(name, "process", str(state_dir), "", nodes, {"machines": True})
    state_dir.mkdir(parents=True, exist_ok=True)
    record.save()
    async with common.stopped_on_failure(lambda: stop_nodes(record), state_dir):
        for node in nodes:
            node.launcher_pid = _launch(node, machined_args)
            progress(node.name, "starting")
        record.save()
        for node in nodes:
            await common.wait_for(
                f"{node.name} maintenance API",
                lambda n=node: common.maintenance_up(n.address),  # type: ignore[misc]
                timeout,
            )
            progress(node.name, "maintenance")
    return record


def is_ours(node: NodeRecord) -> bool:
    """Only signal a pid that is still the launcher we started for this node."""
    args = common.cmdline(node.launcher_pid)
    return b"basalt.provision.launcher" in args and node.node_dir.encode() in args


def machine_running(node: NodeRecord) -> bool:
    """The node's launcher (its "machine") still runs."""
    return is_ours(node) and alive(node.launcher_pid)


async def stop_nodes(record: ClusterRecord, timeout: float = 25.0) -> list[str]:
    """SIGTERM each node's launcher (graceful shutdown), SIGKILL stragglers; returns names."""
    stopped = []
    running = [n for n in record.nodes if is_ours(n)]
    await common.terminate_then_wait([n.launcher_pid for n in running], timeout)
    for node in running:
        if alive(node.launcher_pid) and is_ours(node):
            os.killpg(node.launcher_pid, signal.SIGKILL)
        stopped.append(node.name)
    for node in record.nodes:  # services a killed machined left behind (their own sessions)
        for pid in common.processes_naming(node.node_dir.encode() + b"/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return stopped


async def destroy(record: ClusterRecord) -> list[str]:
    stopped = await stop_nodes(record)
    shutil.rmtree(record.state_dir, ignore_errors=True)
    return stopped
