"""The ``boot`` stage: the kernel and an initramfs that does the least.

The initramfs holds the image's own ``python3.11``, the few stdlib modules its init
imports (measured by importing it, not listed by hand), the libraries those need, the
kernel modules that reach the root (virtio transports, virtio-blk, squashfs) and
``basalt/imager/init.py`` as ``/init``. There is no shell in it either; see
docs/adr/0006-initramfs.md for the choice and its cost.
"""

from __future__ import annotations

import ast
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import cpio, kmod, libs
from .errors import ImageBuildError
from .extensions import CustomExtension, Extension, append_segment, with_digests
from .packages import Unpack, copy_file, run_interpreter
from .rootfs import PYLIB, SITE, Rootfs
from .squashfs import SOURCE_DATE_EPOCH
from .stage import Cache, Stage, run_tool

INIT_SHEBANG = "#!/usr/bin/python3.11 -IS\n"
#: Runs the init file's top level (its imports) with nothing imported before it but
#: what the interpreter itself loads at start; prints the files of every loaded module.
_MEASURE = (
    "import sys; path = sys.argv[1]; "
    "exec(compile(open(path).read(), path, 'exec'), {'__name__': 'basalt_initrd'}); "
    "print(sorted(m.__file__ for m in sys.modules.values() if getattr(m, '__file__', None)))"
)


@dataclass(frozen=True)
class Boot(Stage):
    """``vmlinuz``, ``initrd.img`` and ``boot.json`` (kernel release, sizes)."""

    name = "boot"
    version = 2  # 2: schematic.json carries each extension's sha256
    unpack: Unpack
    rootfs: Rootfs
    kernel_release: str
    modules: tuple[str, ...]
    compression: str = "zstd"
    #: The schematic's extensions and record (``schematic.json``), appended to the
    #: initramfs as a second, uncompressed segment (see basalt/imager/extensions.py).
    extensions: tuple[Extension | CustomExtension, ...] = ()
    schematic: str = ""

    def run(self, out: Path, cache: Cache) -> None:
        tree = cache.output(self.unpack) / "tree"
        root = cache.output(self.rootfs) / "root"
        kernel = tree / "boot" / f"vmlinuz-{self.kernel_release}"
        if not kernel.exists():
            raise ImageBuildError(f"{kernel.name} is not in the kernel package")
        shutil.copy2(kernel, out / "vmlinuz")
        staging = out / "initramfs"
        count = assemble_initramfs(root, staging, self.kernel_release, self.modules)
        raw = out / "initrd.cpio"
        with raw.open("wb") as stream:
            entries = cpio.write(
                staging,
                stream,
                SOURCE_DATE_EPOCH,
                nodes=(cpio.Node("dev/console", 0o600, 5, 1), cpio.Node("dev/null", 0o666, 1, 3)),
            )
        shutil.rmtree(staging)
        image = out / "initrd.img"
        if self.compression == "zstd":
            run_tool(["zstd", "-q", "-19", "-T1", "--rm", str(raw), "-o", str(image)], what="zstd")
        else:
            raw.rename(image)
        images = [cache.output(e) / f"{e.extension_name}.sqfs" for e in self.extensions]
        segment = 0
        if self.schematic:
            record = with_digests(self.schematic, images)
            segment = append_segment(image, images, record, out)
        info = {
            "kernel_release": self.kernel_release,
            "initrd_entries": entries,
            "initrd_modules": count,
            "initrd_compression": self.compression,
            "initrd_extension_entries": segment,
        }
        (out / "boot.json").write_text(json.dumps(info, indent=2) + "\n")


def assemble_initramfs(root: Path, staging: Path, release: str, wanted: tuple[str, ...]) -> int:
    """Fill ``staging`` from the finished root tree; return how many modules it loads."""
    for top in ("bin", "sbin", "lib", "lib64"):
        (staging / top).parent.mkdir(parents=True, exist_ok=True)
        (staging / f"usr/{top}").mkdir(parents=True, exist_ok=True)
        (staging / top).symlink_to(f"usr/{top}")
    for point in ("dev", "proc", "sys", "sysroot", "etc/basalt"):
        (staging / point).mkdir(parents=True, exist_ok=True)
    (staging / "etc/initrd-release").write_text("NAME=Basalt initramfs\nID=basalt\n")
    init_source = root / SITE / "basalt/imager/init.py"
    (staging / "init").write_text(INIT_SHEBANG + init_source.read_text())
    (staging / "init").chmod(0o755)
    copy_file(root / "usr/bin/python3.11", staging / "usr/bin/python3.11")
    elves = [staging / "usr/bin/python3.11"]
    for file in _imported_files(root, init_source):
        relative = Path(file).relative_to(root)
        copy_file(root / relative, staging / relative)
        if relative.suffix == ".so":
            elves.append(staging / relative)
        else:
            pyc = relative.parent / "__pycache__" / f"{relative.stem}.cpython-311.pyc"
            if (root / pyc).exists():
                copy_file(root / pyc, staging / pyc)
    resolution = libs.closure(elves, root, staging)
    if resolution.missing:
        raise ImageBuildError(f"initramfs: libraries not in the root: {resolution.missing}")
    libs.install(resolution, root, staging)
    modules_dir = Path("usr/lib/modules") / release
    order = kmod.resolve(root / modules_dir, wanted)
    for _, relative in order:
        copy_file(root / modules_dir / relative, staging / modules_dir / relative)
    (staging / "etc/basalt/modules.load").write_text(
        "".join(f"/{modules_dir / rel}\n" for _, rel in order)
    )
    run_interpreter(
        staging, ["-S", "-s", "-B", "-c", "import ctypes, os, sys, time"], what="initramfs check"
    )
    return len(order)


def _imported_files(root: Path, init_source: Path) -> list[str]:
    """The files of every module the initrd stage imports, as the image's python sees it."""
    out = run_interpreter(
        root, ["-S", "-s", "-B", "-c", _MEASURE, str(init_source)], what="measure"
    )
    stdlib = str(root / PYLIB)
    files: list[str] = ast.literal_eval(out)
    return [f for f in files if f.startswith(stdlib)]
