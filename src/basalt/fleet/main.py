"""``basalt-fleet``: run the fleet manager.

    basalt-fleet serve [--listen HOST:PORT] [--database URL] [--secrets-key FILE]
                       [--data-dir DIR] [--advertise HOST ...] [--link-port PORT]
                       [--factory-signing-key PREFIX.key] [--factory-extension-key PUB ...]

With no options it listens on 127.0.0.1:8443 (machine links on 8444) with an embedded
SQLite database and its CA under ``~/.basalt/fleet/``. It serves the image factory at
``/factory/`` (docs/factory.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from basalt.machinery.errors import BasaltError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="basalt-fleet", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the fleet (REST API and machine links)")
    serve.add_argument("--listen", default="127.0.0.1:8443", help="HOST:PORT of the REST API")
    serve.add_argument(
        "--link-port", type=int, default=0, help="port of machine links (default: PORT+1)"
    )
    serve.add_argument(
        "--forward-port",
        type=int,
        default=0,
        help="port other replicas forward calls on (default: PORT+2)",
    )
    serve.add_argument("--database", default="", help="SQLAlchemy URL (default: SQLite)")
    serve.add_argument("--secrets-key", type=Path, help="key file sealing secrets at rest")
    serve.add_argument("--data-dir", type=Path, help="default: ~/.basalt/fleet")
    serve.add_argument("--backup-dir", type=Path, help="etcd snapshots (default: DATA/backups)")
    serve.add_argument(
        "--advertise",
        action="append",
        default=[],
        help="a name or address machines reach the fleet by (in join URLs and the "
        "server certificate); repeat for more",
    )
    serve.add_argument("--replica", default="", help="this process's name among replicas")
    serve.add_argument(
        "--releases",
        type=Path,
        help="a release repository (basaltctl release init): served at /releases/ and rolled out",
    )
    serve.add_argument(
        "--promote-min-machines",
        type=int,
        default=3,
        help="a release is promoted only after this many machines ran it healthy",
    )
    serve.add_argument(
        "--promote-min-age",
        default="24h",
        help="... for at least this long (a duration: 30m, 24h, 7d)",
    )
    serve.add_argument(
        "--factory-state", type=Path, help="the image factory's state (default: DATA/factory)"
    )
    serve.add_argument(
        "--factory-lock", type=Path, help="image.lock the factory builds from (the repo's)"
    )
    serve.add_argument(
        "--factory-signing-key",
        type=Path,
        help="PREFIX.key (basaltctl gen signing-key): the factory's images get bundle.tar",
    )
    serve.add_argument(
        "--factory-extension-key",
        type=Path,
        action="append",
        default=[],
        help="a public key trusted to sign custom extensions; repeat for more",
    )
    serve.add_argument(
        "--discovery-port",
        type=int,
        default=0,
        help="serve the discovery service (grpcs, the fleet's certificate) on this port; 0: off",
    )
    serve.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from .core import FleetOptions, default_data_dir

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"basalt-fleet: --listen {args.listen!r}: expected HOST:PORT", file=sys.stderr)
        return 2
    from basalt.machinery.durations import parse_duration

    min_age = parse_duration(args.promote_min_age)
    if min_age is None:
        print(f"basalt-fleet: --promote-min-age {args.promote_min_age!r}: not a duration",
              file=sys.stderr)  # fmt: skip
        return 2
    options = FleetOptions(
        data_dir=args.data_dir or default_data_dir(),
        database=args.database,
        secrets_key=args.secrets_key,
        host=host.strip("[]"),
        port=int(port),
        link_port=args.link_port,
        forward_port=args.forward_port,
        backups=args.backup_dir,
        advertise=tuple(args.advertise),
        replica=args.replica,
        releases=args.releases,
        promote_min_machines=args.promote_min_machines,
        promote_min_seconds=min_age,
        factory_state=args.factory_state,
        factory_lock=args.factory_lock,
        factory_signing_key=args.factory_signing_key,
        factory_extension_keys=tuple(args.factory_extension_key),
        discovery_port=args.discovery_port,
    )
    try:
        from .core import Fleet
        from .server import serve

        fleet = Fleet(options)
        asyncio.run(serve(fleet))
    except BasaltError as exc:
        print(f"basalt-fleet: {exc.render()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
