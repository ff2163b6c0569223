"""The ``rootfs`` stage: the read-only root tree of a Basalt node.

Merged ``/usr``; the Debian interpreter with a pruned stdlib; Basalt and its runtime
wheels in ``/usr/lib/python3/dist-packages`` (on Debian's ``sys.path``); etcd; the shared
libraries all of these need, resolved from ELF; the kernel modules the guest loads;
a minimal ``/etc``; mount points; everything byte-compiled with unchecked hashes (the
root is read-only, so no ``.pyc`` can be written at run time). No shell, no coreutils.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from basalt.machinery.elf import read_elf, section
from basalt.machinery.image_layout import (
    EXTENSIONS_DIR,
    IMAGE_MODULES,
    IMAGE_MOUNT_DIRECTORIES,
    IMAGE_MOUNT_FILES,
    STARTUP_BUNDLE,
)

from . import kmod, libs
from .errors import ImageBuildError
from .lock import WHEEL_TAG_ARGS
from .packages import FetchWheels, Unpack, copy_file, run_interpreter
from .stage import Cache, Stage, run_tool, walk_sorted

PYLIB = "usr/lib/python3.11"
SITE = "usr/lib/python3/dist-packages"
SOURCE = Path(__file__).resolve().parents[1]  # src/basalt
#: Stdlib parts a node never uses; ``nis`` would drag in Kerberos.
PRUNE: tuple[str, ...] = (
    "ensurepip",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "test",
    "lib2to3",
    "pydoc_data",
    "unittest/test",
    "ctypes/test",
    "distutils/tests",
    "sqlite3/test",
    "sitecustomize.py",  # a symlink to Debian's /etc/python3.11, which is not shipped
    "lib-dynload/nis.cpython-311-x86_64-linux-gnu.so",
    # Nothing on a node imports these: help() (pydoc), doctests, virtual environments,
    # WSGI and XML-RPC servers (multiprocessing reaches xmlrpc only for its XML
    # serializer), and decimal's pure-Python twin (the _decimal extension is shipped).
    # unittest stays: pyroute2 imports unittest.mock.
    "pydoc.py",
    "doctest.py",
    "venv",
    "wsgiref",
    "xmlrpc",
    "_pydecimal.py",
)
#: Extension modules dropped by name prefix: CPython's own tests, the CJK codecs (a
#: lookup of shift_jis, gbk, big5 and the like then raises LookupError as for any
#: unknown encoding) and the audio modules.
PRUNE_DYNLOAD_PREFIXES = (
    "_test",
    "_xxtest",
    "_ctypes_test",
    "xxlimited",
    "_xxsub",
    "_codecs_",
    "_multibytecodec",
    "audioop",
    "ossaudiodev",
)
#: Directories the metal platform mounts over (the files it binds over, /etc/hostname
#: and the like, are written by :func:`_etc`).
MOUNT_POINTS = IMAGE_MOUNT_DIRECTORIES
#: The programs besides the interpreter, from the locked packages: etcd, the container
#: runtime (containerd, its runc shim and runc; machined drives containerd through its
#: gRPC API, so no ``ctr``) and mke2fs, which formats STATE and EPHEMERAL at install.
#: Each counts toward the executable budget.
ROOT_PROGRAMS: tuple[str, ...] = (
    "usr/bin/etcd",
    "usr/bin/containerd",
    "usr/bin/containerd-shim-runc-v2",
    "usr/sbin/runc",
    "usr/sbin/mke2fs",
)
#: What the build checks the image's interpreter can import from the finished root.
IMPORT_CHECK = (
    "basalt.imager.init",
    "basalt.machined.main",
    "basalt.machined.platform.metal",
    "basalt.machined.controllers.network",
    "basalt.machined.sys.dhcp",
    "basalt.machined.sys.netlink",
    "pyroute2",
    "basalt.machined.node",
    "basalt.machined.api.server",
    "basalt.machined.system_services",
    "grpc",
    "cryptography.x509",
    "yaml",
    "yaml._yaml",  # yaml itself hides a broken libyaml extension
    "google._upb._message",
    "_cffi_backend",
    "pydantic",
    "psutil",
    "ssl",
    "ctypes",
)
#: The root's init, which the initramfs execs: machined on the metal platform, as
#: ``python3.11 -m basalt.machined --platform metal`` would run it, without a second
#: interpreter start (docs/adr/0008-metal-pid1.md).
INIT_SCRIPT = """#!/usr/bin/python3.11 -I
# Basalt's PID 1: machined on the metal platform (python3.11 -m basalt.machined --platform metal).
import sys

from basalt.machined import startup_bundle

startup_bundle.install()  # its start-up imports from one file (basalt/machined/startup_bundle.py)
from basalt.machined.main import main

sys.exit(main(["--platform", "metal"]))
"""


#: Packages of Basalt a node never runs: the CLI, the fleet manager and the image factory
#: (whose libraries, FastAPI and SQLAlchemy, are not in the image).
NOT_IN_IMAGE = ("cli", "fleet", "factory", "discovery")


def source_digest(root: Path = SOURCE, exclude: tuple[str, ...] = NOT_IN_IMAGE) -> str:
    """sha256 over the Basalt sources that go into the image (paths and contents)."""
    digest = hashlib.sha256()
    for path in _basalt_sources(root, exclude):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _basalt_sources(root: Path, exclude: tuple[str, ...]) -> list[Path]:
    return [
        path
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and path.suffix in (".py", ".typed")
        and "__pycache__" not in path.parts
        and path.relative_to(root).parts[0] not in exclude
    ]


def imager_digest() -> str:
    """sha256 of the imager's own code (``basalt/imager``) as it is on disk now."""
    return source_digest(SOURCE / "imager", ())


#: The imager code this process imported. Stage ids follow the files on disk, and a build
#: must not cache what older code made under the id of newer files.
IMPORTED_IMAGER = imager_digest()


def check_imager_unchanged() -> None:
    """Refuse to build when the imager's code changed since this process imported it."""
    if imager_digest() != IMPORTED_IMAGER:
        raise ImageBuildError(
            f"the imager's code in {SOURCE / 'imager'} changed after this process loaded it: "
            "its outputs would be cached under the ids of the new code",
            hint="run the build again in a new process",
        )


@dataclass(frozen=True)
class BasaltSources(Stage):
    """A snapshot of the Basalt package (``basalt/``) the image ships, taken once so that
    every later stage sees the same files however the work tree changes meanwhile."""

    name = "sources"
    digest: str
    exclude: tuple[str, ...] = NOT_IN_IMAGE

    def run(self, out: Path, cache: Cache) -> None:
        target = out / "basalt"
        for path in _basalt_sources(SOURCE, self.exclude):
            copy_file(path, target / path.relative_to(SOURCE))
        if source_digest(target, ()) != self.digest:
            raise ImageBuildError(
                "Basalt's sources changed while the build copied them",
                hint="run the build again once the edits are done",
            )


@dataclass(frozen=True)
class Rootfs(Stage):
    """Assemble ``root/`` and ``manifest.json`` (dropped modules, copied libraries)."""

    name = "rootfs"
    version = 3  # 2: wheel extension modules stripped, more of the stdlib pruned; 3: bundle
    unpack: Unpack
    wheels: FetchWheels
    sources: BasaltSources
    basalt_version: str
    kernel_release: str
    modules: tuple[str, ...]
    root_modules: tuple[str, ...]

    def run(self, out: Path, cache: Cache) -> None:
        tree = cache.output(self.unpack) / "tree"
        root = out / "root"
        _skeleton(root)
        dropped = _python(tree, root)
        for program in ROOT_PROGRAMS:
            copy_file(tree / program, root / program)
        _install_wheels(cache.output(self.wheels) / "wheels", root / SITE)
        stripped = _strip(root, SITE)
        shutil.copytree(cache.output(self.sources) / "basalt", root / SITE / "basalt")
        modules = _modules(tree, root, self.kernel_release, self.modules, self.root_modules)
        resolution = libs.closure(libs.elf_files(root), tree, root)
        if resolution.missing:
            raise ImageBuildError(
                "shared libraries not found in the locked packages:\n  "
                + "\n  ".join(f"{k}: {', '.join(v)}" for k, v in sorted(resolution.missing.items()))
            )
        libs.install(resolution, tree, root)
        _etc(root, self.basalt_version)
        _compile(tree, root)
        run_interpreter(
            root, ["-s", "-B", "-c", "import " + ", ".join(IMPORT_CHECK)], what="import check"
        )
        _startup_bundle(root)
        _normalize(root)
        manifest = {
            "dropped_stdlib_extensions": dropped,
            "stripped": stripped,
            "libraries": resolution.copied,
            "modules": modules,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _skeleton(root: Path) -> None:
    for directory in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc", SITE):
        (root / directory).mkdir(parents=True, exist_ok=True)
    for top in ("bin", "sbin", "lib", "lib64"):
        (root / top).symlink_to(f"usr/{top}")
    for point in MOUNT_POINTS:
        (root / point).mkdir(parents=True)
    # The initramfs mounts a tmpfs here with the image's system extensions.
    (root / EXTENSIONS_DIR).mkdir(parents=True)


def _python(tree: Path, root: Path) -> list[str]:
    """Interpreter and pruned stdlib; returns the extension modules dropped because a
    library they need is not in the lock (readline, curses, dbm...)."""
    copy_file(tree / "usr/bin/python3.11", root / "usr/bin/python3.11")
    shutil.copytree(
        tree / PYLIB,
        root / PYLIB,
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    for item in PRUNE:
        path = root / PYLIB / item
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    dropped = []
    for ext in sorted((root / PYLIB / "lib-dynload").iterdir()):
        if ext.name.startswith(PRUNE_DYNLOAD_PREFIXES):
            ext.unlink()
        elif libs.closure([ext], tree, root).missing:
            dropped.append(ext.name.split(".")[0])
            ext.unlink()
    return dropped


def _install_wheels(wheels: Path, site: Path) -> None:
    run_tool(
        [
            *(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"),
            *("--no-compile", "--target", str(site), *WHEEL_TAG_ARGS),
            *map(str, sorted(wheels.glob("*.whl"))),
        ],
        what="pip install --target",
    )
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts for the host python
    for direct_url in site.glob("*.dist-info/direct_url.json"):
        direct_url.unlink()  # names the build's cache path; so does its RECORD line
        record = direct_url.with_name("RECORD")
        lines = record.read_text().splitlines(keepends=True)
        record.write_text("".join(ln for ln in lines if "/direct_url.json," not in ln))


def _strip(root: Path, below: str) -> list[str]:
    """Strip the ELF files below ``below`` that carry a symbol table: some wheels ship
    their extension modules unstripped (cryptography's Rust module has 2.9 MB of symbols,
    PyYAML's 2.3 MB of debug info). ``--strip-unneeded`` keeps the dynamic symbols that
    loading needs; Debian's own binaries and libraries arrive stripped."""
    stripped = []
    for path in libs.elf_files(root / below):
        if section(path.read_bytes(), ".symtab") is None:
            continue
        run_tool(["strip", "--strip-unneeded", str(path)], what=f"strip {path.name}")
        stripped.append(str(path.relative_to(root)))
    return stripped


def _modules(
    tree: Path, root: Path, release: str, wanted: tuple[str, ...], root_wanted: tuple[str, ...]
) -> list[str]:
    """Copy ``wanted`` modules (with dependencies); list ``root_wanted`` by name for the
    metal platform, which loads them (and their dependencies) at boot."""
    modules_dir = Path("usr/lib/modules") / release
    every = kmod.resolve(tree / modules_dir, wanted)
    for _, relative in every:
        copy_file(tree / modules_dir / relative, root / modules_dir / relative)
    listing = root / IMAGE_MODULES
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("".join(f"{kmod.module_name(name)}\n" for name in root_wanted))
    return [name for name, _ in every]


def _etc(root: Path, version: str) -> None:
    etc = root / "etc"
    (etc / "os-release").write_text(
        "NAME=Basalt\nID=basalt\n"
        f'VERSION="{version}"\nVERSION_ID={version}\nPRETTY_NAME="Basalt {version}"\n'
    )
    (root / "usr/lib/os-release").write_text((etc / "os-release").read_text())
    (etc / "passwd").write_text("root:x:0:0:root:/var:/nonexistent\n")
    (etc / "group").write_text("root:x:0:\n")
    # Mount targets: on metal, machined bind-mounts the files it generates over these
    # (basalt.machinery.image_layout.GENERATED_ETC_FILES); the root itself is read-only.
    for point in IMAGE_MOUNT_FILES:
        (root / point).write_text("")
    (root / "usr/sbin/init").write_text(INIT_SCRIPT)
    (root / "usr/sbin/init").chmod(0o755)


def _compile(tree: Path, root: Path) -> None:
    """Byte-compile with the image's own interpreter (its magic number, by definition)."""
    run_interpreter(
        tree,
        [
            *("-s", "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash"),
            *("-s", str(root), "-p", "/", str(root / PYLIB), str(root / SITE)),
        ],
        what="compileall",
    )


def _startup_bundle(root: Path) -> None:
    """The byte code machined imports before its API opens, in one file (ADR 0008)."""
    bundle = root / STARTUP_BUNDLE.lstrip("/")
    bundle.parent.mkdir(parents=True, exist_ok=True)
    run_interpreter(
        root,
        ["-s", "-B", "-m", "basalt.machined.startup_bundle", str(bundle), str(root)],
        what="start-up bundle",
    )


def _normalize(root: Path) -> None:
    """Modes independent of the builder's umask, and execute bits only where something
    is meant to run: directories and programs 0755 (ELF programs, the dynamic loader
    they name, ``/usr/sbin/init``), everything else 0644. Debian ships stdlib modules
    such as ``base64.py`` executable with a ``#!`` line; here they are plain modules."""
    runnable = {root / "usr/sbin/init"}
    for path in libs.elf_files(root):
        info = read_elf(path)
        if info.is_program:
            runnable.add(path)
            if info.interpreter:
                runnable.add(root / libs.resolve_in(root, Path(info.interpreter.lstrip("/"))))
    for path in walk_sorted(root):
        if path.is_symlink():
            continue
        runs = path.is_dir() or path in runnable
        os.chmod(path, 0o755 if runs else 0o644)
