"""Kubernetes verbs: kubeconfig."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run
from ._common import info

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client


def default_kubeconfig_path() -> Path:
    """Where kubectl looks first: ``$KUBECONFIG``'s first entry, else ``~/.kube/config``."""
    entries = [e for e in os.environ.get("KUBECONFIG", "").split(os.pathsep) if e]
    return Path(entries[0]) if entries else Path.home() / ".kube" / "config"


def _target(path: str | None) -> Path:
    target = Path(path).expanduser() if path else default_kubeconfig_path()
    if target.is_dir():
        target = target / "kubeconfig"
    # Write through a symlink (a kubeconfig kept in a dotfiles repo), not over it.
    return target.resolve() if target.is_symlink() else target


def write_kubeconfig(data: bytes, target: Path, *, merge: bool, force: bool) -> None:
    """Write the node's kubeconfig to ``target``: merged into what is there, or replacing it."""
    from basalt.machinery.errors import OutputExistsError
    from basalt.machinery.fileio import write_atomic
    from basalt.machinery.kubernetes import dump_kubeconfig, merge_kubeconfig, parse_kubeconfig

    from ._common import read_text

    text = data.decode()
    if merge and target.exists():
        existing = parse_kubeconfig(read_text(target, "kubeconfig"), str(target))
        result = merge_kubeconfig(existing, parse_kubeconfig(text, "the node's kubeconfig"))
        for section, original, stored in result.renamed:
            kind = section.removesuffix("s")
            info(f"{kind} {original!r} exists with other settings; added as {stored!r}")
        write_atomic(target, dump_kubeconfig(result.config), mode=0o600)
        info(f"merged into {target}; current context: {result.current_context}")
        return
    if target.exists() and not force:
        raise OutputExistsError(str(target))
    write_atomic(target, text, mode=0o600)
    info(f"wrote {target}")


def kubeconfig(
    ctx: typer.Context,
    path: Annotated[
        str | None,
        typer.Argument(
            help="Where to write: a file, a directory (gets a file named kubeconfig) or '-' "
            "for stdout. Default: $KUBECONFIG's first entry, else ~/.kube/config.",
            show_default=False,
            metavar="PATH",
        ),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge/--no-merge",
            help="Merge into an existing file (clashing names get a -1 suffix) and make the "
            "new context current; --no-merge writes the file whole.",
        ),
    ] = True,
    force: Annotated[
        bool, typer.Option("-f", "--force", help="With --no-merge: overwrite an existing file.")
    ] = False,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Fetch the cluster admin kubeconfig from a control plane (os:admin only)."""
    from basalt.machinery.api import common_pb2
    from basalt.machinery.errors import BasaltError

    async def work(client: Client, failures: NodeFailures) -> None:
        if len(client.nodes) > 1:
            raise BasaltError(
                f"kubeconfig comes from one control plane; {len(client.nodes)} nodes are "
                f"targeted ({', '.join(client.nodes)})",
                hint="name one control plane with -n NODE",
            )
        answer = await client.machine.Kubeconfig(
            common_pb2.Empty(), metadata=client.metadata(), timeout=30
        )
        for item in failures.keep(answer.messages):
            if path == "-":
                sys.stdout.buffer.write(item.data)
                sys.stdout.flush()
            else:
                write_kubeconfig(item.data, _target(path), merge=merge, force=force)

    run(ctx, work, nodes=nodes, endpoints=endpoints)
