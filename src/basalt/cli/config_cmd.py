"""``basaltctl config``: the client config file and its contexts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ._api import EndpointsOption, NodeFailures, run, split
from ._common import info, options, read_text, refuse_overwrite, write_outputs

if TYPE_CHECKING:
    from basalt.machinery.client.client import Client

app = typer.Typer(
    help="Manage the client config (contexts, endpoints, nodes).", no_args_is_help=True
)


@app.command("contexts")
def contexts(ctx: typer.Context) -> None:
    """List contexts; the current one is marked with *."""
    from ._api import table

    config = options(ctx).load_client_config()
    rows = []
    for name in sorted(config.contexts):
        context = config.contexts[name]
        current = "*" if name == config.context else ""
        rows.append((current, name, ",".join(context.endpoints), ",".join(context.nodes)))
    table(("CURRENT", "NAME", "ENDPOINTS", "NODES"), rows)


@app.command("use-context")
def use_context(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Context name.")]
) -> None:
    """Make NAME the current context."""
    from basalt.machinery.client.config import save_client_config

    opts = options(ctx)
    config = opts.load_client_config()
    config.current(name)
    config.context = name
    save_client_config(config, opts.client_config_path)
    info(f"current context is now {name!r}")


def _set_list(ctx: typer.Context, field: str, values: list[str]) -> None:
    from basalt.machinery.client.config import save_client_config

    opts = options(ctx)
    config = opts.load_client_config()
    name, context = config.current(opts.context)
    setattr(context, field, [v for value in values for v in value.split(",") if v])
    save_client_config(config, opts.client_config_path)
    info(f"context {name!r}: {field} = {','.join(getattr(context, field)) or '(none)'}")


@app.command("endpoint")
def endpoint(
    ctx: typer.Context, endpoints: Annotated[list[str], typer.Argument(help="API endpoints.")]
) -> None:
    """Set the current context's endpoints (the nodes basaltctl dials)."""
    _set_list(ctx, "endpoints", endpoints)


@app.command("node")
def node(
    ctx: typer.Context,
    nodes: Annotated[list[str] | None, typer.Argument(help="Target nodes (none clears).")] = None,
) -> None:
    """Set the current context's default target nodes."""
    _set_list(ctx, "nodes", nodes or [])


@app.command("merge")
def merge(
    ctx: typer.Context, file: Annotated[Path, typer.Argument(help="Client config to merge.")]
) -> None:
    """Merge another client config's contexts into this one (renaming clashes)."""
    from basalt.machinery.client.config import parse_client_config, save_client_config

    opts = options(ctx)
    other = parse_client_config(read_text(file, "client config"), str(file))
    config = opts.load_client_config(missing_ok=True)
    renamed = dict(config.merge(other))
    save_client_config(config, opts.client_config_path)
    for name in other.contexts:
        stored = renamed.get(name, name)
        note = f" (renamed from {name!r}: the name was taken)" if stored != name else ""
        info(f"merged context {stored!r}{note}")
    info(f"current context is {config.context!r} in {opts.client_config_path}")


@app.command("info")
def show_info(ctx: typer.Context) -> None:
    """Show the current context: endpoints, nodes, roles and certificate expiry."""
    from basalt.machinery.pki import certificate_organizations, load_certificate

    opts = options(ctx)
    name, context = opts.load_client_config().current(opts.context)
    cert = load_certificate(context.crt)
    ca = load_certificate(context.ca)
    rows = [
        ("Current context", name),
        ("Endpoints", ", ".join(context.endpoints) or "(none)"),
        ("Nodes", ", ".join(context.nodes) or "(none)"),
        ("Roles", ", ".join(certificate_organizations(context.crt)) or "(none)"),
        ("Certificate", cert.subject.rfc4514_string()),
        ("Certificate expires", f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"),
        ("CA", ca.subject.rfc4514_string()),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key + ':':<{width + 1}} {value}")


@app.command("new")
def new(
    ctx: typer.Context,
    roles: Annotated[
        list[str],
        typer.Option(
            "--roles", help="Roles of the certificate, e.g. os:reader (repeat or comma-list)."
        ),
    ],
    crt_ttl: Annotated[
        str, typer.Option("--crt-ttl", help="Certificate lifetime, e.g. 8760h or 30m.")
    ] = "8760h",
    output: Annotated[Path, typer.Argument(help="Where to write it.")] = Path("basaltconfig"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    endpoints: EndpointsOption = None,
) -> None:
    """Have a control plane issue a client config with the given roles, and write it."""
    from basalt.machinery.api import machine_pb2
    from basalt.machinery.errors import BasaltError
    from basalt.machinery.roles import CLIENT_ROLES

    from .machine import parse_duration

    wanted = split(roles)
    allowed = [r.value for r in CLIENT_ROLES]
    unknown = [r for r in wanted if r not in allowed]
    if unknown or not wanted:
        raise BasaltError(
            f"unknown or missing roles: {', '.join(unknown) or '(none)'}",
            hint=f"choose from {', '.join(allowed)}",
        )
    ttl = int(parse_duration(crt_ttl))
    if ttl <= 0:
        raise BasaltError(f"--crt-ttl {crt_ttl!r} must be positive", hint="e.g. 8760h")
    refuse_overwrite([output], force)
    opts = options(ctx)
    context_name, _ = opts.load_client_config().current(opts.context)
    request = machine_pb2.GenerateClientConfigurationRequest(
        roles=wanted, ttl_seconds=ttl, context=context_name
    )

    async def work(client: Client, failures: NodeFailures) -> None:
        # No target nodes: the endpoint, a control plane holding the CA key, answers.
        answer = await client.machine.GenerateClientConfiguration(
            request, metadata=client.metadata([]), timeout=30
        )
        for item in failures.keep(answer.messages):
            write_outputs({output: item.basaltconfig.decode()})
            info(f"roles {', '.join(wanted)}, valid for {crt_ttl}")

    run(ctx, work, nodes=None, endpoints=endpoints)


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name of the new context.")],
    ca: Annotated[Path, typer.Option("--ca", help="The OS API CA certificate (PEM).")],
    crt: Annotated[Path, typer.Option("--crt", help="The client certificate (PEM).")],
    key: Annotated[Path, typer.Option("--key", help="The client certificate's key (PEM).")],
    endpoints: Annotated[
        list[str], typer.Option("-e", "--endpoints", help="API endpoints (repeat or comma-list).")
    ],
    nodes: Annotated[
        list[str] | None,
        typer.Option("-n", "--nodes", help="Default target nodes (repeat or comma-list)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a context of that name.")] = False,
) -> None:
    """Add a context from PEM files (checked: the key must be the certificate's)."""
    from basalt.machinery.client.config import context_from_files, save_client_config

    opts = options(ctx)
    context = context_from_files(ca, crt, key, endpoints=split(endpoints), nodes=split(nodes or []))
    config = opts.load_client_config(missing_ok=True)
    replaced = config.add(name, context, force=force)
    save_client_config(config, opts.client_config_path)
    info(f"context {name!r} {'replaced' if replaced else 'added'} in {opts.client_config_path}")
    info(f"current context is {config.context!r}")


@app.command("remove")
def remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The context to remove.")],
    force: Annotated[
        bool, typer.Option("--force", help="Remove it even if it is the current context.")
    ] = False,
) -> None:
    """Remove a context (not the current one, unless --force)."""
    from basalt.machinery.client.config import save_client_config

    opts = options(ctx)
    config = opts.load_client_config()
    config.remove(name, force=force)
    save_client_config(config, opts.client_config_path)
    info(f"context {name!r} removed from {opts.client_config_path}")
    if config.context is None:
        info("no context is current now: choose one with 'basaltctl config use-context NAME'")
