"""``basaltctl patch machineconfig`` and ``edit machineconfig``: change a running node's config.

Both start from each target node's own current config (the ``MachineConfigs``
resource ``v1alpha1``, admin only) and send the whole result back through
ApplyConfiguration, so the node validates it and picks how it takes effect, exactly
as for ``apply-config``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run
from ._common import info
from .machine import (
    ApplyModeChoice,
    DryRunOption,
    ModeOption,
    TryTimeoutOption,
    apply_request,
    send_config,
)

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client

patch_app = typer.Typer(help="Patch the config of running nodes.", no_args_is_help=True)
edit_app = typer.Typer(help="Edit the config of running nodes in $EDITOR.", no_args_is_help=True)


def _targets(client: Client) -> list[str]:
    """Each target node; ``""`` stands for the endpoint itself when none is named."""
    return list(client.nodes) or [""]


def _label(client: Client, node: str) -> str:
    return node or client.endpoint


async def current_config(client: Client, failures: NodeFailures, node: str) -> str | None:
    """The config ``node`` runs (YAML), or None when it failed (reported)."""
    import json

    from basalt.machinery.api import resource_pb2

    answer = await client.resources.Get(
        resource_pb2.ResourceGetRequest(type="MachineConfigs", id="v1alpha1"),
        metadata=client.metadata([node] if node else []),
        timeout=15,
    )
    for got in failures.keep(answer.messages):
        text: str = json.loads(got.resource.spec_json or "{}").get("yaml", "")
        return text
    return None


def _local_failure(failures: NodeFailures, label: str, message: str) -> None:
    print(f"error: {label}: {message}", file=sys.stderr)
    failures.count += 1


@patch_app.command("machineconfig")
def patch_machineconfig(
    ctx: typer.Context,
    patches: Annotated[
        list[str],
        typer.Option("-p", "--patch", help="Patch: @file or inline YAML; repeat to apply several."),
    ],
    mode: ModeOption = ApplyModeChoice.auto,
    dry_run: DryRunOption = False,
    try_timeout: TryTimeoutOption = "1m",
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Patch each node's current config and apply the result to that node."""
    from basalt.machinery.config import load_bundle, load_patch, patch_and_check
    from basalt.machinery.errors import BasaltError

    loaded = [load_patch(p, index=i) for i, p in enumerate(patches, start=1)]

    async def work(client: Client, failures: NodeFailures) -> None:
        for node in _targets(client):
            label = _label(client, node)
            text = await current_config(client, failures, node)
            if text is None:
                continue
            source = f"{label} machine config"
            try:
                bundle = load_bundle(text, source)
                # The node reports the warnings itself; only errors stop us here.
                patched, _ = patch_and_check(bundle.to_raw(), loaded, target=f"{source} (patched)")
            except BasaltError as exc:
                _local_failure(failures, label, exc.render())
                continue
            request = apply_request(patched.to_yaml().encode(), mode, dry_run, try_timeout)
            await send_config(client, failures, request, [node] if node else [])

    run(ctx, work, nodes=nodes, endpoints=endpoints)


_HEADER = (
    "# The machine config of {label}. Save and quit to apply it (--mode {mode});\n"
    "# quit without changes to apply nothing. The node validates it before use.\n"
)


def _run_editor(text: str, label: str) -> tuple[Path, str]:
    """Write ``text`` to a file, open it in $VISUAL/$EDITOR, return (path, edited text)."""
    from basalt.machinery.errors import BasaltError

    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in label)
    fd, name = tempfile.mkstemp(prefix=f"basalt-{safe}-", suffix=".yaml")
    path = Path(name)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    try:
        status = subprocess.run([*shlex.split(editor), str(path)], check=False).returncode
    except OSError as exc:
        path.unlink()
        raise BasaltError(
            f"cannot start the editor {editor!r}: {exc}", hint="set $EDITOR, e.g. EDITOR=nano"
        ) from None
    if status != 0:
        raise BasaltError(
            f"the editor {editor!r} exited with status {status}; nothing was applied",
            hint=f"your edits, if any, are in {path}",
        )
    return path, path.read_text(encoding="utf-8")


@edit_app.command("machineconfig")
def edit_machineconfig(
    ctx: typer.Context,
    mode: ModeOption = ApplyModeChoice.auto,
    try_timeout: TryTimeoutOption = "1m",
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Edit each node's current config in $EDITOR, then apply it to that node."""
    from asyncio import to_thread

    import grpc.aio

    async def work(client: Client, failures: NodeFailures) -> None:
        for node in _targets(client):
            label = _label(client, node)
            current = await current_config(client, failures, node)
            if current is None:
                continue
            original = _HEADER.format(label=label, mode=mode.value) + current
            path, edited = await to_thread(_run_editor, original, label)
            if edited == original:
                path.unlink()
                info(f"{label}: no changes; nothing applied")
                continue
            request = apply_request(edited.encode(), mode, False, try_timeout)
            try:
                accepted = await send_config(client, failures, request, [node] if node else [])
            except grpc.aio.AioRpcError as exc:
                failures.report(label, exc.details() or "", exc.code().value[0])
                accepted = False
            if accepted:
                path.unlink()
            else:
                retry = f"basaltctl apply-config -f {path}"
                retry += f" -n {node}" if node else ""
                retry += f" --mode {mode.value}" if mode is not ApplyModeChoice.auto else ""
                info(f"{label}: your edits are kept in {path}; fix them and apply with '{retry}'")

    run(ctx, work, nodes=nodes, endpoints=endpoints)
