"""Machine verbs: version, apply-config, reboot, shutdown, reset."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ._api import EndpointsOption, InsecureOption, NodeFailures, NodesOption, action_verb, run
from ._common import info, read_text

if TYPE_CHECKING:
    from basalt.machinery.api import machine_pb2
    from basalt.machinery.client.client import Client


def version(
    ctx: typer.Context,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
    insecure: InsecureOption = False,
    client_only: Annotated[bool, typer.Option("--client", help="Only this basaltctl.")] = False,
) -> None:
    """Show the client's version and each node's."""
    import basalt

    print(f"Client: basaltctl {basalt.__version__}")
    if client_only:
        return
    from basalt.machinery.api import common_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.Version(
            common_pb2.Empty(), metadata=client.metadata(), timeout=15
        )
        for item in failures.keep(answer.messages):
            print(f"Node {item.metadata.node}: basalt {item.tag} ({item.mode} mode)")
            print(f"  Platform: {item.platform}/{item.arch}  Python: {item.python}")
            if item.schematic:
                print(f"  Schematic: {item.schematic}")
            if item.machine_type:
                print(f"  Type: {item.machine_type}  Hostname: {item.hostname}")

    run(ctx, work, nodes=nodes, endpoints=endpoints, insecure=insecure)


class ApplyModeChoice(StrEnum):
    auto = "auto"
    no_reboot = "no-reboot"
    reboot = "reboot"
    staged = "staged"
    try_ = "try"


def parse_duration(text: str) -> float:
    from basalt.machinery.durations import parse_duration as seconds_of
    from basalt.machinery.errors import BasaltError

    seconds = seconds_of(text)
    if seconds is not None:
        return seconds
    try:
        return float(text)
    except ValueError:
        raise BasaltError(f"{text!r} is not a duration", hint="e.g. 90s, 2m or 1h") from None


ModeOption = Annotated[
    ApplyModeChoice, typer.Option("-m", "--mode", help="How the change takes effect.")
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Show the diff and the mode; change nothing.")
]
TryTimeoutOption = Annotated[
    str, typer.Option("--timeout", help="With --mode try: revert after this long.")
]
AllowIdentityOption = Annotated[
    bool,
    typer.Option(
        "--allow-identity-change",
        help="Apply even though the config changes the node's identity (cluster id or secret, "
        "OS/etcd/Kubernetes CAs, machine type): os:admin only; clients of the current OS CA "
        "lose access.",
    ),
]


def apply_request(
    data: bytes,
    mode: ApplyModeChoice,
    dry_run: bool,
    try_timeout: str,
    allow_identity_change: bool = False,
) -> machine_pb2.ApplyConfigurationRequest:
    """The ApplyConfiguration request for a whole config text (apply-config, patch, edit)."""
    from basalt.machinery.api import machine_pb2

    return machine_pb2.ApplyConfigurationRequest(
        data=data,
        mode=machine_pb2.ApplyMode.Value(mode.value.upper().replace("-", "_")),
        dry_run=dry_run,
        try_timeout_seconds=int(parse_duration(try_timeout)),
        allow_identity_change=allow_identity_change,
    )


async def send_config(
    client: Client,
    failures: NodeFailures,
    request: machine_pb2.ApplyConfigurationRequest,
    nodes: Sequence[str] | None = None,
) -> bool:
    """Send ``request`` to ``nodes`` (default: the client's) and print each node's answer.

    Returns whether every node accepted it; nodes that refused are reported as failures.
    """
    from basalt.machinery.api import machine_pb2

    answer = await client.machine.ApplyConfiguration(
        request, metadata=client.metadata(nodes), timeout=60
    )
    kept = failures.keep(answer.messages)
    for item in kept:
        chosen = machine_pb2.ApplyMode.Name(item.mode).lower().replace("_", "-")
        print(f"{item.metadata.node}: mode {chosen}: {item.mode_details}")
        for warning in item.warnings:
            info(f"{item.metadata.node}: {warning}")
        if item.diff:
            sys.stdout.write(item.diff)
    return len(kept) == len(answer.messages)


def apply_config(
    ctx: typer.Context,
    file: Annotated[Path, typer.Option("-f", "--file", help="Machine config to apply.")],
    mode: ModeOption = ApplyModeChoice.auto,
    dry_run: DryRunOption = False,
    try_timeout: TryTimeoutOption = "1m",
    allow_identity_change: AllowIdentityOption = False,
    config_patch: Annotated[
        list[str] | None, typer.Option("-p", "--config-patch", help="Patch the file first.")
    ] = None,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Apply a machine config to nodes (maintenance mode: --insecure -n NODE)."""
    from basalt.machinery.config import load_bundle, load_patch, patch_and_check

    source = str(file)
    bundle = load_bundle(read_text(file, "config"), source)
    if config_patch:
        patches = [load_patch(p, index=i) for i, p in enumerate(config_patch, start=1)]
        bundle, _ = patch_and_check(bundle.to_raw(), patches, target=f"{source} (patched)")
    request = apply_request(
        bundle.to_yaml().encode(), mode, dry_run, try_timeout, allow_identity_change
    )

    async def work(client: Client, failures: NodeFailures) -> None:
        await send_config(client, failures, request)

    run(ctx, work, nodes=nodes, endpoints=endpoints, insecure=insecure)


def reboot(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """Reboot nodes (in container mode the process restarts)."""
    from basalt.machinery.api import machine_pb2

    action_verb(ctx, "Reboot", machine_pb2.RebootRequest(), nodes=nodes, endpoints=endpoints)


def shutdown(
    ctx: typer.Context, nodes: NodesOption = None, endpoints: EndpointsOption = None
) -> None:
    """Shut nodes down."""
    from basalt.machinery.api import machine_pb2

    action_verb(ctx, "Shutdown", machine_pb2.ShutdownRequest(), nodes=nodes, endpoints=endpoints)


class WipeChoice(StrEnum):
    all = "all"
    state = "state"
    ephemeral = "ephemeral"


def reset(
    ctx: typer.Context,
    graceful: Annotated[
        bool, typer.Option("--graceful/--no-graceful", help="Leave the cluster first.")
    ] = True,
    wipe_mode: Annotated[
        WipeChoice, typer.Option("--wipe-mode", help="What to wipe.")
    ] = WipeChoice.all,
    reboot_after: Annotated[
        bool,
        typer.Option(
            "--reboot",
            help="Reboot afterwards (into maintenance when STATE is wiped), not shut down.",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Leave etcd even when that costs quorum.")
    ] = False,
    destroy_last_member: Annotated[
        bool,
        typer.Option(
            "--destroy-last-member",
            help="--graceful on the last etcd member: end the etcd cluster and its data.",
        ),
    ] = False,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Reset nodes: wipe STATE and/or EPHEMERAL, then shut down or reboot."""
    from basalt.machinery.api import machine_pb2

    request = machine_pb2.ResetRequest(
        graceful=graceful,
        wipe_mode=machine_pb2.WipeMode.Value(wipe_mode.value.upper()),
        reboot=reboot_after,
        force=force,
        destroy_last_etcd_member=destroy_last_member,
    )
    action_verb(ctx, "Reset", request, nodes=nodes, endpoints=endpoints)
