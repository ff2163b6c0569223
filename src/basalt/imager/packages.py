"""Stages that bring the locked inputs in: fetch ``.deb`` files and wheels, unpack debs."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageBuildError, ImageLockError
from .lock import LockedDeb, LockedWheel, download_debs, download_wheels
from .stage import Cache, Stage, run_tool, sha256_file

#: Top-level directories that merged-/usr folds into /usr.
MERGED = ("bin", "sbin", "lib", "lib64")


@dataclass(frozen=True)
class FetchDebs(Stage):
    """``apt-get download`` every locked ``.deb`` (apt verifies it against the signed
    archive) and check each against the sha256 in the lock. Output: ``debs/*.deb``."""

    name = "fetch-debs"
    debs: tuple[LockedDeb, ...]

    def run(self, out: Path, cache: Cache) -> None:
        target = out / "debs"
        target.mkdir()
        found = download_debs([f"{d.name}={d.version}" for d in self.debs], target)
        for deb in self.debs:
            got = found.get(deb.name)
            if got is None or got.sha256 != deb.sha256:
                raise ImageLockError(
                    f"{deb.name} {deb.version}: apt served "
                    + (f"sha256 {got.sha256}" if got else "nothing")
                    + f", the lock says {deb.sha256}",
                    hint="the archive changed under the lock: run 'basaltctl image lock'",
                )
        target.chmod(0o755)


@dataclass(frozen=True)
class FetchWheels(Stage):
    """``pip download`` the locked wheels for the target's tags; check their sha256."""

    name = "fetch-wheels"
    wheels: tuple[LockedWheel, ...]

    def run(self, out: Path, cache: Cache) -> None:
        target = out / "wheels"
        target.mkdir()
        download_wheels({w.name: w.version for w in self.wheels}, target)
        for wheel in self.wheels:
            path = target / wheel.file
            if not path.exists() or sha256_file(path) != wheel.sha256:
                raise ImageLockError(
                    f"wheel {wheel.file}: "
                    + ("not downloaded" if not path.exists() else "sha256 differs from the lock"),
                    hint="run 'basaltctl image lock'",
                )


@dataclass(frozen=True)
class Unpack(Stage):
    """Every fetched ``.deb`` unpacked with ``dpkg-deb -x`` into one merged-/usr tree
    (``tree/``): ``/lib``, ``/bin``... are folded into ``/usr``. Nothing is configured:
    maintainer scripts never run."""

    name = "unpack"
    debs: FetchDebs

    def run(self, out: Path, cache: Cache) -> None:
        tree = out / "tree"
        tree.mkdir()
        for deb in sorted((cache.output(self.debs) / "debs").glob("*.deb")):
            run_tool(["dpkg-deb", "-x", str(deb), str(tree)], what=f"unpack {deb.name}")
        merge_usr(tree)


def merge_usr(tree: Path) -> None:
    """Move ``/lib``, ``/bin``, ... into ``/usr`` and leave symlinks in their place."""
    usr = tree / "usr"
    usr.mkdir(exist_ok=True)
    for top in MERGED:
        source = tree / top
        if source.is_symlink():
            continue
        if source.is_dir():
            _move_into(source, usr / top)
            source.rmdir()
        source.symlink_to(f"usr/{top}")


def _move_into(source: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    for entry in sorted(source.iterdir()):
        dest = target / entry.name
        if entry.is_dir() and not entry.is_symlink() and dest.is_dir():
            _move_into(entry, dest)
            entry.rmdir()
        else:
            if dest.exists() or dest.is_symlink():
                dest.unlink()
            os.replace(entry, dest)


def copy_file(source: Path, dest: Path) -> None:
    """Copy a file or symlink (as a symlink), creating parents."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.is_symlink():
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.symlink_to(os.readlink(source))
    else:
        shutil.copy2(source, dest)


def interpreter_command(tree: Path) -> list[str]:
    """Run the unpacked Debian ``python3.11`` from ``tree`` through its own dynamic loader,
    so the host's libc is never mixed with the tree's."""
    libdir = tree / "usr/lib/x86_64-linux-gnu"
    return [
        str(libdir / "ld-linux-x86-64.so.2"),
        "--library-path",
        str(libdir),
        str(tree / "usr/bin/python3.11"),
    ]


def run_interpreter(tree: Path, args: list[str], *, what: str) -> str:
    env = {"PYTHONHOME": str(tree / "usr"), "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}
    argv = [*interpreter_command(tree), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise ImageBuildError(f"{what}: cannot run the image's python3.11: {exc}") from None
    if done.returncode != 0:
        raise ImageBuildError(f"{what} failed:\n{(done.stderr or done.stdout)[-3000:]}")
    return done.stdout
