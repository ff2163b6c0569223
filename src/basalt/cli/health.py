"""``basaltctl health``: the cluster's health, checked from here or on a node.

Without ``-n``, the checks of :mod:`basalt.machinery.health` run against the whole
cluster (its members, or ``--control-plane-nodes`` / ``--worker-nodes``), each printed
as it starts and ends; the first failure ends the command with exit 1, naming the
check and the node. ``--server`` has a node run the same checks (the ClusterHealth RPC)
and stream them back. ``-n NODES`` without ``--server``, or ``--node-only``, shows each
node's own checks as a table (as before the cluster checks existed).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run, split, table

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client
    from basalt.machinery.health import KubeApi, Progress

WaitOption = Annotated[
    float,
    typer.Option("--wait", help="Re-try a failing check up to this many seconds (0: check once)."),
]


def health(
    ctx: typer.Context,
    wait: WaitOption = 0.0,
    server: Annotated[
        bool,
        typer.Option("--server", help="Have the node (the endpoint, or -n NODE) run the checks."),
    ] = False,
    node_only: Annotated[
        bool, typer.Option("--node-only", help="Only each node's own checks, as a table.")
    ] = False,
    control_plane_nodes: Annotated[
        list[str] | None,
        typer.Option(
            "--control-plane-nodes", help="Control planes to check; default: the members."
        ),
    ] = None,
    worker_nodes: Annotated[
        list[str] | None,
        typer.Option("--worker-nodes", help="Workers to check; default: the members."),
    ] = None,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Check the cluster: nodes, services, etcd, versions, boot, time, Kubernetes."""
    from basalt.machinery.errors import BasaltError

    if wait < 0:
        raise BasaltError(f"--wait {wait:g} is negative", hint="give seconds, e.g. --wait 300")
    control_planes, workers = split(control_plane_nodes), split(worker_nodes)
    if node_only or (nodes and not server):
        if control_planes or workers:
            raise BasaltError(
                "--control-plane-nodes/--worker-nodes are for the cluster checks",
                hint="drop --node-only and -n (or add --server -n NODE to run them there)",
            )
        _node_checks(ctx, wait, nodes, endpoints)
        return
    if server and len(split(nodes)) > 1:
        raise BasaltError(
            f"--server runs the checks on one node; {len(split(nodes))} were named",
            hint="name one control plane with -n",
        )

    async def work(client: Client, failures: NodeFailures) -> None:
        if server:
            await _on_server(client, split(nodes), control_planes, workers, wait)
        else:
            await _from_client(client, control_planes, workers, wait)

    run(ctx, work, nodes=nodes if server else [], endpoints=endpoints)


def show(step: Progress) -> None:
    """One line per step, flushed at once; a failure becomes the command's error."""
    from basalt.machinery.errors import BasaltError

    where = f" ({step.message})" if step.message else ""
    if step.status == "running":
        print(f"waiting for {step.check} ...", flush=True)
    elif step.status == "ok":
        print(f"{step.check}: OK{where}", flush=True)
    elif step.status == "warning":
        print(f"{step.check}: WARNING: {step.message}", flush=True)
    elif step.status == "skipped":
        print(f"{step.check}: skipped: {step.message}", flush=True)
    else:
        raise BasaltError(
            f"cluster health: {step.check}: FAILED: {step.message}",
            hint="see 'basaltctl health -n NODE' and 'basaltctl services -n NODE' on that "
            "node; --wait SECONDS re-tries while the cluster settles",
        )


def kube_client(data: bytes) -> KubeApi:
    """A Kubernetes API client from the admin kubeconfig a control plane handed out."""
    from pathlib import Path

    from basalt.machined.kubernetes.client import KubeClient, credentials_from
    from basalt.machinery.kubernetes import parse_kubeconfig

    source = "the admin kubeconfig (from the Kubeconfig API)"
    parsed = parse_kubeconfig(data.decode(errors="replace"), source)
    return KubeClient(credentials_from(parsed, source, Path("/nonexistent")))


async def _from_client(
    client: Client, control_planes: list[str], workers: list[str], wait: float
) -> None:
    from basalt.machinery.health import ClientCaller, Targets, discover, run_checks

    caller = ClientCaller(client)
    targets = Targets(control_planes, workers)
    if not targets.all:
        targets = await discover(caller)
    async for step in run_checks(caller, targets, wait=wait, kube=kube_client):
        show(step)


async def _on_server(
    client: Client, node: list[str], control_planes: list[str], workers: list[str], wait: float
) -> None:
    from basalt.machinery.api import machine_pb2
    from basalt.machinery.client.client import APIError
    from basalt.machinery.health import Progress

    request = machine_pb2.ClusterHealthRequest(
        control_planes=control_planes, workers=workers, wait_seconds=wait
    )
    stream = client.machine.ClusterHealth(
        request, metadata=client.metadata(node), timeout=wait + 600
    )
    async for item in stream:
        if item.metadata.error:
            raise APIError(
                f"{item.metadata.node}: {item.metadata.error}",
                code=str(item.metadata.code),
                node=item.metadata.node,
            )
        show(Progress(item.check, item.status, item.message, item.node))  # type: ignore[arg-type]


def _node_checks(
    ctx: typer.Context, wait: float, nodes: list[str] | None, endpoints: list[str] | None
) -> None:
    """Each node's own checks (the Health RPC), as a table."""
    from asyncio import sleep

    from basalt.machinery.api import common_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        deadline = time.monotonic() + wait
        while True:
            answer = await client.machine.Health(
                common_pb2.Empty(), metadata=client.metadata(), timeout=15
            )
            healthy = all(m.healthy and not m.metadata.error for m in answer.messages)
            if healthy or time.monotonic() >= deadline:
                break
            await sleep(1.0)
        rows = []
        for item in failures.keep(answer.messages):
            for check in item.checks:
                rows.append(
                    (item.metadata.node, check.name, "ok" if check.ok else "FAIL", check.message)
                )
            if not item.healthy:
                failures.count += 1
        table(("NODE", "CHECK", "RESULT", "DETAILS"), rows)
        sys.stdout.flush()

    run(ctx, work, nodes=nodes, endpoints=endpoints)
