"""The ``basaltctl`` entry point: global options, verb groups and error reporting.

Heavy imports (pydantic, cryptography) happen inside commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import (
    cluster,
    config_cmd,
    diagnostics,
    edit,
    files,
    gen,
    machine,
    machineconfig,
    resources,
    services,
    validate,
)
from ._common import GlobalOptions

app = typer.Typer(
    name="basaltctl",
    help="Manage Basalt nodes: generate and validate machine configs, talk to the node API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(gen.app, name="gen")
app.add_typer(config_cmd.app, name="config")
app.add_typer(machineconfig.app, name="machineconfig")
app.add_typer(cluster.app, name="cluster")
app.add_typer(edit.patch_app, name="patch")
app.add_typer(edit.edit_app, name="edit")
app.command("validate")(validate.validate)
app.command("version")(machine.version)
app.command("apply-config")(machine.apply_config)
app.command("reboot")(machine.reboot)
app.command("shutdown")(machine.shutdown)
app.command("reset")(machine.reset)
app.command("health")(machine.health)
app.command("services")(services.services)
app.command("service")(services.service)
app.command("logs")(services.logs)
app.command("get")(resources.get)
app.command("dmesg")(diagnostics.dmesg)
app.command("events")(diagnostics.events)
app.command("ps")(diagnostics.ps)
app.command("memory")(diagnostics.memory)
app.command("mounts")(diagnostics.mounts)
app.command("netstat")(diagnostics.netstat)
app.command("ls")(files.ls)
app.command("read")(files.read)
app.command("copy")(files.copy)

_state = GlobalOptions()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show stack traces for errors.")] = False,
    basaltconfig: Annotated[
        Path | None,
        typer.Option(
            "--basaltconfig",
            envvar="BASALTCONFIG",
            help="Client config file (default: ~/.basalt/config).",
        ),
    ] = None,
    context: Annotated[
        str | None, typer.Option("--context", help="Context to use instead of the current one.")
    ] = None,
) -> None:
    _state.debug = debug
    _state.basaltconfig = basaltconfig
    _state.context = context
    ctx.obj = _state


def main(argv: list[str] | None = None) -> int:
    """Run basaltctl; BasaltErrors become one clear message and exit code 1."""
    from basalt.machinery.errors import BasaltError

    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's own logs are not for users
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, prog_name="basaltctl")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BasaltError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {exc.render()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(
            "  hint: this is a bug in basaltctl; rerun with --debug and report the trace",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
