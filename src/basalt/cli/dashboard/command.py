"""The ``dashboard`` verb: check the options and the client config, then run the app."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from .._api import EndpointsOption, NodesOption, split
from .._common import options

if TYPE_CHECKING:
    from basalt.machinery.client.config import ClientConfig, FleetLogin

    from .source import FleetAPISource, NodeSource

#: ``--fleet login``: the fleet ``basaltctl fleet login`` stored, whatever its URL.
FLEET_LOGIN = "login"


def dashboard(
    ctx: typer.Context,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
    fleet: Annotated[
        str | None,
        typer.Option(
            "--fleet",
            help="Also show a Basalt Fleet: its URL (as logged in with 'basaltctl fleet "
            "login') or 'login' for the stored one. Without -n, only the fleet.",
        ),
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", help="Seconds between polls of the shown node.")
    ] = 2.0,
) -> None:
    """A live view of nodes: summary, services, logs, processes, graphs; '?' for keys."""
    from basalt.machinery.errors import BasaltError

    if interval < 0.5:
        raise BasaltError(
            f"--interval {interval}: polls must be at least 0.5 s apart",
            hint="the default is 2 s; nodes sample CPU and memory every 30 s anyway",
        )
    opts = options(ctx)
    config = opts.load_client_config(missing_ok=fleet is not None)
    fleet_source = _fleet_source(config, fleet) if fleet is not None else None
    node_source = None
    subtitle = fleet_source.url if fleet_source else ""
    if nodes or endpoints or fleet is None:
        node_source, subtitle = _node_source(config, opts.context, split(nodes), split(endpoints))
    if not sys.stdout.isatty() or not sys.stdin.isatty():
        raise BasaltError(
            "the dashboard needs a terminal (stdin and stdout are not both one)",
            hint="for scripts use 'basaltctl services', 'ps', 'get systemstats' or 'health'",
        )
    from .app import DashboardApp

    DashboardApp(node_source, fleet_source, interval=interval, subtitle=subtitle).run()


def _node_source(
    config: ClientConfig, context_name: str | None, nodes: list[str], endpoints: list[str]
) -> tuple[NodeSource, str]:
    from basalt.machinery.client.client import Client
    from basalt.machinery.errors import BasaltError

    from .source import NodeAPISource

    name, context = config.current(context_name)
    targets = nodes or list(context.nodes) or (endpoints or list(context.endpoints))[:1]
    if not targets:
        raise BasaltError(
            f"context {name!r} names no nodes and no endpoint",
            hint="pass -n NODE[,NODE...] (and -e ENDPOINT), or set them with "
            "'basaltctl config node' / 'basaltctl config endpoint'",
        )

    async def connect() -> Client:
        return await Client.from_context(context, endpoints=endpoints, nodes=targets)

    dialled = (endpoints or list(context.endpoints) or ["?"])[0]
    return NodeAPISource(connect, targets), f"context {name}, endpoint {dialled}"


def _fleet_source(config: ClientConfig, wanted: str) -> FleetAPISource:
    from basalt.machinery.errors import BasaltError

    from .source import FleetAPISource

    login: FleetLogin | None = config.fleet
    if login is None:
        raise BasaltError(
            f"--fleet {wanted}: not logged in to a fleet",
            hint="run 'basaltctl fleet login https://HOST:PORT --token-file FILE --ca CA.crt'",
        )
    if wanted != FLEET_LOGIN and wanted.rstrip("/") != login.url.rstrip("/"):
        if not wanted.startswith(("https://", "http://")):
            raise BasaltError(
                f"--fleet {wanted!r} is neither a fleet URL nor 'login'",
                hint=f"give the URL you logged in to ({login.url}) or 'login'",
            )
        raise BasaltError(
            f"--fleet {wanted}: the stored login is for {login.url}, not this URL",
            hint=f"run 'basaltctl fleet login {wanted} ...' first, or use --fleet login",
        )
    return FleetAPISource(login)
