"""Signed bundles of a built image whose Basalt says another version, for trying metal
upgrades: the vm tests (``tests/vm/test_upgrade.py``) and ``bench/upgrade.py --platform
qemu``.

A real second release would be a second build; what an upgrade test needs is a bundle
that verifies, boots and reports a version the node does not run. So the image's kernel
and initramfs are kept, and its root is unpacked, Basalt's ``__version__`` replaced (and,
when asked, more files edited), the byte-code of every edited module dropped (the root's
``.pyc`` files are unchecked-hash and its start-up bundle holds the code of machined's
start-up: a stale copy would win over the edit), and repacked with
zstd: a fast level by default (the slot takes it as it is), or the image's own level
(``level=``) where the bundle's size matters, as in ``bench/upgrade.py``.

    python -m basalt.imager.variant --image _out/image --version 0.2.0 \\
        --key release.key -o basalt-0.2.0.tar
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from basalt.machined import startup_bundle
from basalt.machinery.image_layout import STARTUP_BUNDLE
from basalt.machinery.images import INITRAMFS, KERNEL, ROOTFS, create_bundle, load_signing_key

from .errors import ImageError

#: Where the image's root keeps the basalt package.
SITE = Path("usr/lib/python3/dist-packages")
_VERSION_LINE = re.compile(r'(__version__ = [^\n]*?)"([^"]+)"\s*$', re.M)

#: Edits more files of the unpacked root (its path); returns the files it changed.
Edit = Callable[[Path], Iterable[Path]]


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ImageError(f"{argv[0]} failed (exit {done.returncode}): {done.stderr.strip()}")


def set_version(tree: Path, version: str) -> Path:
    """Make the basalt package in the unpacked root ``tree`` say ``version``."""
    init = tree / SITE / "basalt" / "__init__.py"
    text = init.read_text()
    changed, count = _VERSION_LINE.subn(lambda m: f'{m.group(1)}"{version}"', text)
    if count != 1:
        raise ImageError(f"{init}: no single __version__ line ending in a string to replace")
    init.write_text(changed)
    return init


def drop_bytecode(tree: Path, sources: Iterable[Path]) -> None:
    """Remove the cached byte-code of ``sources`` in the unpacked root ``tree``, and their
    modules from its start-up bundle (Python then compiles them at import)."""
    sources = list(sources)
    for source in sources:
        for pyc in (source.parent / "__pycache__").glob(f"{source.stem}.*.pyc"):
            pyc.unlink()
    bundle = tree / STARTUP_BUNDLE.lstrip("/")
    if bundle.exists():
        origins = ["/" + str(source.relative_to(tree)) for source in sources]
        bundle.write_bytes(startup_bundle.without(bundle.read_bytes(), origins))


#: The zstd level of a variant's root unless told otherwise: fast to pack, ~15 % larger.
FAST_LEVEL = 3


def repack_root(
    root: Path, out: Path, version: str, edit: Edit | None = None, level: int = FAST_LEVEL
) -> Path:
    """``root`` (a squashfs) repacked to ``out`` with Basalt saying ``version``."""
    with tempfile.TemporaryDirectory(prefix="variant-", dir=out.parent) as work:
        tree = Path(work) / "root"
        _run(["unsquashfs", "-q", "-n", "-d", str(tree), str(root)])
        changed = [set_version(tree, version), *(edit(tree) if edit else ())]
        drop_bytecode(tree, changed)
        _run(
            ["mksquashfs", str(tree), str(out), "-noappend", "-no-progress", "-quiet",
             "-comp", "zstd", "-Xcompression-level", str(level), "-all-root", "-b", "256K"]
        )  # fmt: skip
    return out


def variant_bundle(
    image_dir: Path,
    out: Path,
    version: str,
    key: ed25519.Ed25519PrivateKey,
    edit: Edit | None = None,
    *,
    schematic_id: str = "default",
    arch: str = "x86_64",
    level: int = FAST_LEVEL,
) -> Path:
    """A signed metal bundle at ``out``: the image in ``image_dir`` saying ``version``, its
    root packed at zstd ``level``."""
    root = repack_root(image_dir / "root.sqfs", out.with_suffix(".sqfs"), version, edit, level)
    try:
        files = {KERNEL: image_dir / "vmlinuz", INITRAMFS: image_dir / "initrd.img", ROOTFS: root}
        create_bundle(out, files, version, schematic_id, arch, key, platform="metal")
    finally:
        root.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m basalt.imager.variant")
    parser.add_argument("--image", type=Path, required=True, help="a built image directory")
    parser.add_argument("--version", required=True)
    parser.add_argument("--key", type=Path, required=True, help="the signing key (PEM)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if shutil.which("unsquashfs") is None or shutil.which("mksquashfs") is None:
        print("error: needs squashfs-tools (make image-deps)", file=sys.stderr)
        return 1
    key = load_signing_key(args.key.read_text())
    variant_bundle(args.image, args.out, args.version, key)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
