"""Build a container-mode upgrade bundle from a Basalt source tree.

A container node's slot runs the ``basalt`` package from its bundle: the payload is
``basalt.tar``, a tar of the package (``basalt/...``; no ``__pycache__``). The tar is
reproducible (sorted members, uid/gid 0, mtime from ``SOURCE_DATE_EPOCH`` or 0), and
the bundle is signed like any other (:func:`basalt.machinery.images.create_bundle`).

    python -m basalt.provision.bundle_from_tree --src src/basalt --version 0.2.0 \\
        --key release.key -o basalt-0.2.0.tar
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives.asymmetric import ed25519

from basalt.machinery.errors import BasaltError
from basalt.machinery.images import BASALT_TREE, Manifest, create_bundle, load_signing_key

PACKAGE = "basalt"
_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")


def _tree(src: Path) -> Iterator[tuple[Path, str]]:
    """(path, name in the tar) for every directory and regular file, sorted, no caches."""
    for directory, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        here = Path(directory)
        inside = PurePosixPath(PACKAGE, here.relative_to(src).as_posix())
        yield here, inside.as_posix()
        for name in sorted(files):
            path = here / name
            if name.endswith(_SKIP_SUFFIXES) or path.is_symlink() or not path.is_file():
                continue
            yield path, (inside / name).as_posix()


def write_tree_tar(src: Path, out: Path, mtime: int = 0) -> None:
    """Write the ``basalt`` package under ``src`` as an uncompressed, reproducible tar."""
    if not (src / "__init__.py").is_file():
        raise BasaltError(
            f"{src} is not the basalt package (no __init__.py)", hint="give --src src/basalt"
        )
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path, name in _tree(src):
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = mtime
            info.mode = 0o755 if info.isdir() else 0o644
            if info.isdir():
                tar.addfile(info)
            else:
                with open(path, "rb") as handle:
                    tar.addfile(info, handle)


def bundle_from_tree(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    version: str,
    signing_key: ed25519.Ed25519PrivateKey,
    *,
    arch: str = "x86_64",
    schematic_id: str = "container",
    overwrite: bool = False,
) -> Manifest:
    """Tar the source tree and write a signed container bundle of it to ``out``."""
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or 0)
    with tempfile.TemporaryDirectory(prefix="basalt-tree-") as temp:
        tree = Path(temp) / BASALT_TREE
        write_tree_tar(Path(src), tree, epoch)
        return create_bundle(
            out,
            {BASALT_TREE: tree},
            version,
            schematic_id,
            arch,
            signing_key,
            tar=True,
            overwrite=overwrite,
            platform="container",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m basalt.provision.bundle_from_tree",
        description="Build a signed container-mode upgrade bundle from a Basalt source tree.",
    )
    parser.add_argument("--src", type=Path, required=True, help="the basalt package directory")
    parser.add_argument("--version", required=True, help="the bundle's Basalt version")
    parser.add_argument("--key", type=Path, required=True, help="signing key (PREFIX.key)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="bundle to write (.tar)")
    parser.add_argument("--arch", default="x86_64", help="x86_64 or aarch64")
    parser.add_argument("--schematic-id", default="container")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    args = parser.parse_args(argv)
    try:
        key = load_signing_key(args.key.read_bytes(), str(args.key))
        manifest = bundle_from_tree(
            args.src,
            args.output,
            args.version,
            key,
            arch=args.arch,
            schematic_id=args.schematic_id,
            overwrite=args.force,
        )
    except (BasaltError, OSError) as exc:
        text = exc.render() if isinstance(exc, BasaltError) else str(exc)
        print(f"error: {text}", file=sys.stderr)
        return 1
    print(
        f"bundle {args.output}: basalt {manifest.version} {manifest.architecture} (container), "
        f"{manifest.total_size} bytes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
