"""``basaltctl upgrade`` and ``basaltctl rollback``: A/B slot upgrades of a node.

The bundle is streamed to the node itself (uploads are never forwarded: the node is
dialled directly) or, given as an http(s) URL, fetched by the node; either way it is
verified there against the node's trusted keys before anything is written, and
installed into the inactive slot; the node then reboots into it on trial. ``--wait``
follows it until its health gates pass, or until it falls back; ``--rolling`` does that
for each ``-n`` node in turn and stops at the first that does not come back good.
"""

from __future__ import annotations

import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run, single_node, split
from ._common import info

if TYPE_CHECKING:
    from basalt.machinery.api import machine_pb2
    from basalt.machinery.client.client import Client

POLL = 1.0


class RebootMode(StrEnum):
    powercycle = "powercycle"
    kexec = "kexec"


RebootModeOption = Annotated[
    RebootMode,
    typer.Option(
        "--reboot-mode",
        help="powercycle: reboot through the firmware, which picks and counts the slot; "
        "kexec: load the new slot's kernel and jump to it, skipping the firmware (metal; "
        "the try is counted the same way; through the firmware when the kernel refuses).",
    ),
]


def _reboot_mode(mode: RebootMode) -> machine_pb2.RebootMode.ValueType:
    from basalt.machinery.api import machine_pb2

    if mode is RebootMode.kexec:
        return machine_pb2.KEXEC
    return machine_pb2.POWERCYCLE


def _target(ctx: typer.Context, nodes: list[str], endpoints: list[str]) -> str:
    """The one node to upgrade."""
    return single_node(
        ctx,
        nodes,
        endpoints,
        what="upgrade works on one node at a time",
        hint="name it with -n NODE; upgrade control planes one after the other with --wait",
    )


def _require_bundle_file(image: Path) -> None:
    from basalt.machinery.errors import BasaltError

    if not image.is_file():
        what = "does not exist" if not image.exists() else "is not a file"
        raise BasaltError(
            f"bundle {image} {what}",
            hint="give the .tar bundle made by 'basaltctl bundle create' or bundle_from_tree",
        )


class _Progress:
    """A progress bar on a terminal (rich), one line otherwise."""

    def __init__(self, node: str, image: Path, size: int) -> None:
        self.bar: Any = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                TextColumn(f"{node}: uploading {image.name}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.task = self.bar.add_task("upload", total=size)
            self.bar.start()
        else:
            info(f"{node}: uploading {image} ({size} bytes)")

    def advance(self, count: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def is_url(image: str) -> bool:
    return image.startswith(("http://", "https://"))


async def _boot_status(client: Client) -> dict[str, Any] | None:
    import json

    from basalt.machinery.api import resource_pb2

    answer = await client.resources.Get(
        resource_pb2.ResourceGetRequest(type="BootStatuses", id="boot"),
        metadata=client.metadata([]),
        timeout=5,
    )
    for item in answer.messages:
        if item.metadata.error:
            return None
        spec: dict[str, Any] = json.loads(item.resource.spec_json)
        return spec
    return None


async def _wait_for_slot(
    client: Client, failures: NodeFailures, node: str, slot: str, version: str, timeout: float
) -> None:
    """Follow the node through its reboot until the new slot is good, or it fell back."""
    import asyncio

    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        await asyncio.sleep(POLL)
        try:
            status = await _boot_status(client)
        except Exception:  # rebooting: not answering yet
            continue
        if status is None:
            continue
        if status.get("fellBackFrom") == slot:
            _failed(failures, node, f"upgrade to {version} failed: {status.get('summary')}")
            return
        if status.get("slot") == slot:
            if not status.get("onTrial"):
                print(f"{node}: {status.get('summary')}; health gates passed")
                return
            if seen != "trial":
                seen = "trial"
                info(f"{node}: booted slot {slot} ({version}) on trial; waiting for its gates")
    _failed(failures, node, f"no verdict on slot {slot} ({version}) within {timeout:g}s")


def _failed(failures: NodeFailures, node: str, message: str) -> None:
    print(f"error: {node}: {message}", file=sys.stderr)
    failures.count += 1


def upgrade(
    ctx: typer.Context,
    image: Annotated[
        str,
        typer.Option(
            "--image",
            help="Signed bundle to install: a .tar file (uploaded) or an http(s):// URL "
            "(the node fetches it).",
        ),
    ],
    stage: Annotated[
        bool, typer.Option("--stage", help="Install early in the next boot instead of now.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Skip the etcd quorum pre-check (control planes).")
    ] = False,
    no_drain: Annotated[
        bool, typer.Option("--no-drain", help="Do not cordon and drain through Kubernetes.")
    ] = False,
    allow_downgrade: Annotated[
        bool,
        typer.Option(
            "--allow-downgrade",
            help="Install a bundle older than the running version (refused otherwise).",
        ),
    ] = False,
    reboot_mode: RebootModeOption = RebootMode.powercycle,
    full_upload: Annotated[
        bool,
        typer.Option(
            "--full-upload",
            help="Send the whole bundle, not only what the node's running image lacks.",
        ),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the node until the new slot is good.")
    ] = False,
    rolling: Annotated[
        bool,
        typer.Option(
            "--rolling",
            help="Upgrade every -n node, one at a time: each must be good on its new slot "
            "before the next starts; stop at the first failure.",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to --wait.")] = 600.0,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Upgrade a node from a signed bundle: verify, write the other slot, reboot into it.

    The node refuses bundles that are unsigned, signed by a key it does not trust,
    tampered with, or built for another architecture, before it writes anything.
    After the reboot the new slot must pass its health gates, or the node falls back.
    An uploaded bundle with a chunk index goes as a delta: only the chunks the node's
    running image does not hold are sent (the node checks each against the signed index).
    """
    from basalt.machinery.api import machine_pb2
    from basalt.machinery.client.bundle_upload import options_only, plan_upload
    from basalt.machinery.client.client import upload
    from basalt.machinery.errors import BasaltError

    targets = split(nodes)
    if rolling:
        if not targets:
            raise BasaltError(
                "--rolling upgrades the nodes named with -n", hint="e.g. -n cp1,cp2,cp3 --rolling"
            )
        if stage:
            raise BasaltError(
                "--rolling with --stage: a staged upgrade waits for a reboot, so the next "
                "node would start before this one runs its new slot",
                hint="drop --stage, or stage each node and reboot them yourself",
            )
    else:
        targets = [_target(ctx, targets, split(endpoints))]
    path = None if is_url(image) else Path(image)
    if path is not None:
        _require_bundle_file(path)
    request_options = machine_pb2.UpgradeOptions(
        stage=stage,
        force=force,
        no_drain=no_drain,
        url=image if path is None else "",
        reboot_mode=_reboot_mode(reboot_mode),
        allow_downgrade=allow_downgrade,
    )

    def one(node: str) -> None:
        async def work(client: Client, failures: NodeFailures) -> None:
            # No target metadata: the node answers itself (uploads are not forwarded).
            metadata = client.metadata([])
            progress = None
            if path is None:
                info(f"{node}: fetching {image}")
                requests = options_only(request_options)
            else:
                plan = await plan_upload(client.machine, path, metadata=metadata, whole=full_upload)
                if plan.delta is not None:
                    info(f"{node}: sending {plan.describe()}")
                progress = _Progress(node, path, plan.size)
                requests = plan.requests(request_options, progress.advance)
            try:
                answer = await upload(
                    client.machine.Upgrade,
                    requests,
                    metadata=metadata,
                    timeout=max(600.0, timeout),
                )
            finally:
                if progress is not None:
                    progress.close()
            for item in failures.keep(answer.messages):
                for step in item.steps:
                    info(f"{item.metadata.node}: {step}")
                print(f"{item.metadata.node}: {item.message}")
                if (wait or rolling) and item.slot:
                    await _wait_for_slot(client, failures, node, item.slot, item.version, timeout)

        run(ctx, work, nodes=[node], endpoints=[node])

    for done, node in enumerate(targets):
        try:
            one(node)
        except (typer.Exit, Exception):  # a refused RPC raises; a failed --wait exits 1
            if rolling and targets[done + 1 :]:
                untouched = ", ".join(targets[done + 1 :])
                print(
                    f"error: rolling upgrade stopped at {node}; not upgraded: {untouched}",
                    file=sys.stderr,
                )
            raise
        if rolling:
            info(f"rolling upgrade: {done + 1}/{len(targets)} nodes done")


def rollback(
    ctx: typer.Context,
    no_drain: Annotated[
        bool, typer.Option("--no-drain", help="Do not cordon and drain through Kubernetes.")
    ] = False,
    reboot_mode: RebootModeOption = RebootMode.powercycle,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Boot the other slot, if it holds a good image; refused with the reason otherwise.

    Like an upgrade, the node is cordoned and drained first when its kubelet runs, and
    uncordoned once it runs the other slot.
    """
    from basalt.machinery.api import machine_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        # A drain waits for pods to leave: as long as machined's drain timeout allows.
        answer = await client.machine.Rollback(
            machine_pb2.RollbackRequest(
                no_drain=no_drain,
                reboot_mode=_reboot_mode(reboot_mode),
            ),
            metadata=client.metadata(),
            timeout=600,
        )
        for item in failures.keep(answer.messages):
            print(f"{item.metadata.node}: {item.message}")

    run(ctx, work, nodes=nodes, endpoints=endpoints)


def update(
    ctx: typer.Context,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply", help="Take the next hop now: any mode, outside windows (slot still taken)."
        ),
    ] = False,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Ask each node's updater (UpdateConfig) to check its release channel now; with
    --apply, to upgrade to the next hop of its path now. `get updatestatus` shows more."""
    from basalt.machinery.api import machine_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        answer = await client.machine.UpdateCheck(
            machine_pb2.UpdateCheckRequest(apply=apply),
            metadata=client.metadata(),
            timeout=900,
        )
        for item in failures.keep(answer.messages):
            print(f"{item.metadata.node}: {item.message}")

    run(ctx, work, nodes=nodes, endpoints=endpoints)
