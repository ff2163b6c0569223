"""The ``basaltctl`` entry point: global options, verb groups and error reporting.

Start-up time is paid by every command: only the module of the verb being run is
imported (all of them for help), and heavy libraries load inside commands.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ._common import GlobalOptions

#: Verb groups and verbs: name -> (module in basalt.cli, attribute). This one table
#: drives registration.
GROUPS: dict[str, tuple[str, str]] = {
    "gen": ("gen", "app"),
    "config": ("config_cmd", "app"),
    "machineconfig": ("machineconfig", "app"),
    "cluster": ("cluster", "app"),
    "patch": ("edit", "patch_app"),
    "edit": ("edit", "edit_app"),
    "etcd": ("etcd", "app"),
    "bundle": ("bundle", "app"),
    "image": ("image", "app"),
    "extension": ("extension", "app"),
    "containers": ("containers", "app"),
    "inspect": ("inspect", "app"),
    "fleet": ("fleet", "app"),
    "release": ("release", "app"),
    "meta": ("meta", "app"),
    "wipe": ("wipe", "app"),
}
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("validate", "validate"),
    "version": ("machine", "version"),
    "apply-config": ("machine", "apply_config"),
    "reboot": ("machine", "reboot"),
    "shutdown": ("machine", "shutdown"),
    "reset": ("machine", "reset"),
    "health": ("health", "health"),
    "bootstrap": ("etcd", "bootstrap"),
    "services": ("services", "services"),
    "service": ("services", "service"),
    "logs": ("services", "logs"),
    "get": ("resources", "get"),
    "dmesg": ("diagnostics", "dmesg"),
    "events": ("diagnostics", "events"),
    "ps": ("diagnostics", "ps"),
    "memory": ("diagnostics", "memory"),
    "mounts": ("diagnostics", "mounts"),
    "netstat": ("diagnostics", "netstat"),
    "ls": ("files", "ls"),
    "read": ("files", "read"),
    "copy": ("files", "copy"),
    "kubeconfig": ("kubernetes", "kubeconfig"),
    "upgrade": ("upgrade", "upgrade"),
    "rollback": ("upgrade", "rollback"),
    "update": ("upgrade", "update"),
    "rotate-ca": ("rotate_ca", "rotate_ca"),
    "dashboard": ("dashboard", "dashboard"),
    "stats": ("node_info", "stats"),
    "cgroups": ("node_info", "cgroups"),
    "time": ("node_info", "time"),
    "usage": ("node_info", "usage"),
    "pcap": ("pcap", "pcap"),
    "support": ("support", "support"),
    "completion": ("completion", "completion"),
}
_VALUE_OPTIONS = ("--basaltconfig", "--context")

_state = GlobalOptions()


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


def invoked_verb(argv: list[str]) -> str | None:
    """The verb on the command line (skipping global options), if it is a known one."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in _VALUE_OPTIONS:
            skip = True
        elif not token.startswith("-"):
            return token if token in GROUPS or token in COMMANDS else None
    return None


def build_app(verb: str | None = None) -> typer.Typer:
    """The typer app with every verb, or only ``verb`` (the one being run)."""
    from importlib import import_module

    app = typer.Typer(
        name="basaltctl",
        help="Manage Basalt nodes: generate and validate machine configs, talk to the node API.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    for name, (module, attr) in GROUPS.items():
        if verb in (None, name):
            app.add_typer(getattr(import_module(f".{module}", __package__), attr), name=name)
    for name, (module, attr) in COMMANDS.items():
        if verb in (None, name):
            app.command(name)(getattr(import_module(f".{module}", __package__), attr))
    return app


def main(argv: list[str] | None = None) -> int:
    """Run basaltctl; BasaltErrors become one clear message and exit code 1."""
    from basalt.machinery.errors import BasaltError

    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's own logs are not for users
    if os.environ.get("_BASALTCTL_COMPLETE"):  # a shell asks (basaltctl completion SHELL)
        from .completion import Verbs, complete

        verbs = Verbs({*GROUPS, *COMMANDS}, build_app, invoked_verb)
        return complete(os.environ["_BASALTCTL_COMPLETE"], verbs)
    args = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in args
    try:
        build_app(invoked_verb(args))(args=args, prog_name="basaltctl")
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
