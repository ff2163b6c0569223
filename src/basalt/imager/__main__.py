"""``python -m basalt.imager {lock,build,inspect}``: the imager without the CLI."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from basalt.machinery.errors import BasaltError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m basalt.imager")
    verbs = parser.add_subparsers(dest="verb", required=True)
    lock = verbs.add_parser("lock", help="resolve packages and wheels; write image.lock")
    lock.add_argument("--lock", type=Path, default=None)
    build = verbs.add_parser("build", help="build the image from image.lock")
    build.add_argument("--out", type=Path, default=None)
    build.add_argument("--cache", type=Path, default=None)
    build.add_argument("--lock", type=Path, default=None)
    build.add_argument(
        "--schematic", type=Path, default=None, help="schematic YAML (extensions, kernel args)"
    )
    build.add_argument(
        "--signing-key",
        type=Path,
        default=None,
        help="Ed25519 key (basaltctl gen signing-key): also write the signed bundle.tar",
    )
    inspect = verbs.add_parser("inspect", help="describe a built image directory")
    inspect.add_argument("image", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    from . import lock as lockfile
    from . import pipeline

    try:
        if args.verb == "lock":
            written = lockfile.write(args.lock or lockfile.DEFAULT_LOCK)
            print(f"locked {len(written.debs)} packages and {len(written.wheels)} wheels")
        elif args.verb == "build":
            from basalt.machinery.schematic import EMPTY, read_schematic

            manifest = pipeline.build(
                args.out or pipeline.DEFAULT_OUT,
                args.cache or pipeline.DEFAULT_CACHE,
                args.lock or lockfile.DEFAULT_LOCK,
                schematic=read_schematic(args.schematic) if args.schematic else EMPTY,
                signing_key=args.signing_key,
            )
            print(json.dumps(manifest["files"], indent=2))
        else:
            print(json.dumps(pipeline.inspect(args.image), indent=2))
    except BasaltError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
