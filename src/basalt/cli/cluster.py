"""``basaltctl cluster``: local clusters (the ``process`` provisioner)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ._common import info, options

app = typer.Typer(help="Create, show and destroy local clusters.", no_args_is_help=True)

NameOption = Annotated[str, typer.Option("--name", help="Cluster name.")]
StateDirOption = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Where the cluster lives [~/.basalt/clusters/NAME]."),
]


def _state_dir(name: str, state_dir: Path | None) -> Path:
    from basalt.provision.state import default_clusters_dir

    return (state_dir or default_clusters_dir() / name).resolve()


class _ProgressView:
    """A live table of nodes and their stage (plain lines when not on a terminal)."""

    def __init__(self, names: list[str]) -> None:
        self.stages = dict.fromkeys(names, "planned")
        self.started = time.monotonic()
        self.live = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self._render(), console=Console(stderr=True), refresh_per_second=8)

    def _render(self) -> object:
        from rich.table import Table

        table = Table(title="basalt cluster", box=None)
        table.add_column("NODE")
        table.add_column("STAGE")
        for name, stage in self.stages.items():
            style = "green" if stage == "ready" else "yellow"
            table.add_row(name, f"[{style}]{stage}[/{style}]")
        return table

    def update(self, name: str, stage: str) -> None:
        self.stages[name] = stage
        if self.live is not None:
            self.live.update(self._render())
        else:
            info(f"{time.monotonic() - self.started:6.1f}s  {name}: {stage}")

    def __enter__(self) -> _ProgressView:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)


@app.command("create")
def create(
    ctx: typer.Context,
    name: NameOption = "basalt",
    controlplanes: Annotated[int, typer.Option("--controlplanes", help="Control planes.")] = 1,
    workers: Annotated[int, typer.Option("--workers", help="Workers.")] = 1,
    state_dir: StateDirOption = None,
    base_address: Annotated[
        str, typer.Option("--base-address", help="First node address (loopback).")
    ] = "127.0.0.11",
    version_contract: Annotated[
        str | None, typer.Option("--version-contract", help="Contract for the configs.")
    ] = None,
    config_patch: Annotated[
        list[str] | None, typer.Option("--config-patch", help="Patch every node's config.")
    ] = None,
    ready_timeout: Annotated[
        float, typer.Option("--wait-timeout", help="Seconds to wait for nodes to be ready.")
    ] = 120.0,
    skip_bootstrap: Annotated[
        bool,
        typer.Option("--skip-bootstrap", help="Do not bootstrap etcd (run 'bootstrap' yourself)."),
    ] = False,
) -> None:
    """Create a cluster of node processes on loopback addresses, without root."""
    from basalt.machinery.client.config import save_client_config
    from basalt.machinery.config import load_patch
    from basalt.provision.process import ClusterRequest, load_context, plan_nodes
    from basalt.provision.process import create as create_cluster

    directory = _state_dir(name, state_dir)
    request = ClusterRequest(
        name=name,
        controlplanes=controlplanes,
        workers=workers,
        base_address=base_address,
        version_contract=version_contract or "0.1",
        patches=tuple(load_patch(p, index=i) for i, p in enumerate(config_patch or [], 1)),
        ready_timeout=ready_timeout,
        bootstrap=not skip_bootstrap,
    )
    names = [n.name for n in plan_nodes(request, directory)]
    started = time.monotonic()
    import asyncio

    with _ProgressView(names) as view:
        record = asyncio.run(create_cluster(request, directory, view.update))
    elapsed = time.monotonic() - started
    opts = options(ctx)
    client_config = opts.load_client_config(missing_ok=True)
    renamed = dict(client_config.merge(load_context(record)))
    context_name = renamed.get(name, name)
    client_config.context = context_name
    save_client_config(client_config, opts.client_config_path)
    info(f"cluster {name!r} is ready in {elapsed:.1f}s: {len(record.nodes)} nodes")
    info(f"context {context_name!r} added to {opts.client_config_path} and made current")
    for node in record.nodes:
        print(f"{node.name}\t{node.type}\t{node.address}")


@app.command("show")
def show(name: NameOption = "basalt", state_dir: StateDirOption = None) -> None:
    """Show a cluster's nodes and whether their processes run."""
    from basalt.provision.process import _alive, _is_our_launcher
    from basalt.provision.state import ClusterRecord

    from ._api import table

    record = ClusterRecord.load(_state_dir(name, state_dir))
    rows = []
    for node in record.nodes:
        running = _is_our_launcher(node.launcher_pid, node.node_dir) and _alive(node.launcher_pid)
        rows.append(
            (
                node.name,
                node.type,
                node.address,
                node.launcher_pid,
                "running" if running else "stopped",
            )
        )
    print(f"cluster {record.name} ({record.provisioner}), endpoint {record.endpoint}")
    table(("NODE", "TYPE", "ADDRESS", "LAUNCHER PID", "PROCESS"), rows)


@app.command("destroy")
def destroy(name: NameOption = "basalt", state_dir: StateDirOption = None) -> None:
    """Stop the cluster's processes (only those it started) and remove its state."""
    import asyncio

    from basalt.provision.process import destroy as destroy_cluster
    from basalt.provision.state import ClusterRecord

    record = ClusterRecord.load(_state_dir(name, state_dir))
    stopped = asyncio.run(destroy_cluster(record))
    info(f"cluster {name!r} destroyed ({len(stopped)} node processes stopped)")
