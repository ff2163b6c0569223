"""``basaltctl cluster``: local clusters (the ``process`` and ``qemu`` provisioners)."""

from __future__ import annotations

import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ._common import info, options

if TYPE_CHECKING:
    from rich.live import Live
    from rich.table import Table

app = typer.Typer(help="Create, show and destroy local clusters.", no_args_is_help=True)

NameOption = Annotated[str, typer.Option("--name", help="Cluster name.")]
StateDirOption = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Where the cluster lives [~/.basalt/clusters/NAME]."),
]


class Provisioner(StrEnum):
    process = "process"
    qemu = "qemu"


class Accel(StrEnum):
    auto = "auto"
    kvm = "kvm"
    tcg = "tcg"


def _state_dir(name: str, state_dir: Path | None) -> Path:
    from basalt.provision.state import default_clusters_dir

    return (state_dir or default_clusters_dir() / name).resolve()


class _ProgressView:
    """A live table of nodes and their stage (plain lines when not on a terminal)."""

    def __init__(self, names: list[str]) -> None:
        self.stages = dict.fromkeys(names, "planned")
        self.started = time.monotonic()
        self.live: Live | None = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self._render(), console=Console(stderr=True), refresh_per_second=8)

    def _render(self) -> Table:
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
    provisioner: Annotated[
        Provisioner,
        typer.Option(
            "--provisioner",
            help="process: node processes; qemu: VMs booting the system image (both rootless).",
        ),
    ] = Provisioner.process,
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
        float | None,
        typer.Option(
            "--wait-timeout", help="Seconds to wait for nodes to be ready [process 120, qemu 300]."
        ),
    ] = None,
    skip_bootstrap: Annotated[
        bool,
        typer.Option("--skip-bootstrap", help="Do not bootstrap etcd (run 'bootstrap' yourself)."),
    ] = False,
    memory: Annotated[
        int | None, typer.Option("--memory", help="qemu: MiB of memory per VM [512].")
    ] = None,
    cpus: Annotated[int | None, typer.Option("--cpus", help="qemu: vCPUs per VM [2].")] = None,
    image: Annotated[
        Path | None,
        typer.Option(
            "--image", help="qemu: a built image directory [_out/image, built if missing]."
        ),
    ] = None,
    accel: Annotated[
        Accel | None,
        typer.Option(
            "--accel", help="qemu: auto (KVM if a probe boots a guest, else TCG), kvm, tcg."
        ),
    ] = None,
    network: Annotated[
        str | None,
        typer.Option(
            "--network",
            help="qemu: bridge (root: a namespace of the cluster's own, any number of "
            "control planes), user (rootless: one control plane), auto [bridge if root].",
        ),
    ] = None,
) -> None:
    """Create a local cluster without root: node processes, or QEMU VMs of the image."""
    from basalt.machinery.client.config import save_client_config
    from basalt.machinery.config import load_patch
    from basalt.machinery.errors import BasaltError
    from basalt.provision import backend
    from basalt.provision.common import load_context
    from basalt.provision.process import ClusterRequest

    vm_flags = {
        "--memory": memory,
        "--cpus": cpus,
        "--image": image,
        "--accel": accel,
        "--network": network,
    }
    given = [flag for flag, value in vm_flags.items() if value is not None]
    if provisioner is Provisioner.process and given:
        raise BasaltError(f"{', '.join(given)} only apply to VMs", hint="add --provisioner qemu")
    qemu = provisioner is Provisioner.qemu
    directory = _state_dir(name, state_dir)
    request = ClusterRequest(
        name=name,
        controlplanes=controlplanes,
        workers=workers,
        base_address=base_address,
        version_contract=version_contract or "0.1",
        patches=tuple(load_patch(p, index=i) for i, p in enumerate(config_patch or [], 1)),
        ready_timeout=ready_timeout if ready_timeout is not None else (300.0 if qemu else 120.0),
        bootstrap=not skip_bootstrap,
    )
    module = backend(provisioner.value)
    plan_args = (network or "auto",) if qemu else ()
    names = [n.name for n in module.plan_nodes(request, directory, *plan_args)]
    started = time.monotonic()
    import asyncio

    if qemu:
        from basalt.provision.qemu import VmOptions
        from basalt.provision.state import default_clusters_dir

        vm = VmOptions(
            memory_mib=memory or 512,
            cpus=cpus or 2,
            image_dir=image,
            accel=(accel or Accel.auto).value,
            network=network or "auto",
        )
        cache = default_clusters_dir() / ".kvm-probe.json"
        with _ProgressView(names) as view:
            record = asyncio.run(
                module.create(request, directory, view.update, vm, kvm_cache=cache)
            )
        info(f"accelerator: {record.options['accel']} ({record.options['accel_reason']})")
        info(f"network: {record.options['network_reason']}")
    else:
        with _ProgressView(names) as view:
            record = asyncio.run(module.create(request, directory, view.update))
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


@app.command("machines")
def machines(
    name: NameOption = "pool",
    count: Annotated[int, typer.Option("--count", help="How many machines.")] = 3,
    fleet: Annotated[
        str,
        typer.Option(
            "--fleet",
            help="The fleet they enrol with: the URL 'basaltctl fleet token create' prints.",
        ),
    ] = "",
    state_dir: StateDirOption = None,
    base_address: Annotated[
        str, typer.Option("--base-address", help="First machine address (loopback).")
    ] = "127.0.0.41",
) -> None:
    """Start machines (node processes) that stay in maintenance mode: a pool for a fleet."""
    import asyncio

    from basalt.machinery.errors import BasaltError
    from basalt.provision.process import create_machines

    if fleet:
        from basalt.machinery.fleetlink.url import parse_fleet_url

        parse_fleet_url(fleet, "--fleet")
    elif count > 0:
        raise BasaltError(
            "--fleet URL is required: machines without a fleet or a config do nothing",
            hint="make one with 'basaltctl fleet token create --uses N'",
        )
    directory = _state_dir(name, state_dir)
    args = ("--fleet", fleet) if fleet else ()
    names = [f"{name}-machine-{i}" for i in range(1, count + 1)]
    with _ProgressView(names) as view:
        record = asyncio.run(
            create_machines(
                name, count, directory, view.update, base_address=base_address, machined_args=args
            )
        )
    info(
        f"{len(record.nodes)} machines in maintenance mode; stop them with "
        f"'basaltctl cluster destroy --name {name}'"
    )
    for node in record.nodes:
        print(f"{node.name}\t{node.address}")


@app.command("show")
def show(name: NameOption = "basalt", state_dir: StateDirOption = None) -> None:
    """Show a cluster's nodes and whether their machines (processes or VMs) run."""
    from basalt.provision import backend
    from basalt.provision.state import ClusterRecord

    from ._api import table

    record = ClusterRecord.load(_state_dir(name, state_dir))
    module = backend(record.provisioner)
    rows = []
    for node in record.nodes:
        running = module.machine_running(node)
        rows.append(
            (
                node.name,
                node.type,
                node.address,
                node.guest_address or node.address,
                node.launcher_pid,
                "running" if running else "stopped",
            )
        )
    print(f"cluster {record.name} ({record.provisioner}), endpoint {record.endpoint}")
    for key, value in record.options.items():
        print(f"{key}: {value}")
    table(("NODE", "TYPE", "API ADDRESS", "NODE ADDRESS", "PID", "MACHINE"), rows)


@app.command("destroy")
def destroy(name: NameOption = "basalt", state_dir: StateDirOption = None) -> None:
    """Stop the cluster's processes or VMs (only those it started) and remove its state."""
    import asyncio

    from basalt.provision import backend
    from basalt.provision.state import ClusterRecord

    record = ClusterRecord.load(_state_dir(name, state_dir))
    stopped = asyncio.run(backend(record.provisioner).destroy(record))
    what = "VMs" if record.provisioner == "qemu" else "node processes"
    info(f"cluster {name!r} destroyed ({len(stopped)} {what} stopped)")
