"""Container-mode storage for A/B slots: directories under ``<node-dir>/slots``.

::

    slots/
      boot.json      the BootState (codecs.state_to_json), replaced atomically
      a/  b/         one slot each: manifest.json, manifest.sig, the payload (basalt.tar)
                     and python/ (basalt.tar unpacked: what the launcher puts first on
                     PYTHONPATH when it starts machined from this slot)
      .b.tmp/        a slot being written; renamed to b/ only once complete and synced
      staged/        a verified bundle waiting for the next boot (``upgrade --stage``)

Slot ``a`` without a directory holds the image the node was installed with: the
launcher's own Basalt (a container node is "installed" by starting it). The launcher
and machined share this module; the launcher writes ``boot.json`` only while machined
is not running, and machined only while it runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from basalt.machinery.errors import BasaltError, ErrorKind
from basalt.machinery.fileio import copy_range, write_atomic
from basalt.machinery.images.manifest import MANIFEST_NAME
from basalt.machinery.images.payload import BASALT_TREE

from .assessment import BootState, Slot, SlotName
from .codecs import state_from_json, state_to_json

if TYPE_CHECKING:
    from basalt.machinery.images import VerifiedBundle

STATE_FILE = "boot.json"
_SYNC_THREADS = 8
PYTHON_DIR = "python"
STAGED_DIR = "staged"
STAGED_BUNDLE = "bundle.tar"
#: The top-level directory a container payload's tar must hold, and nothing else.
PACKAGE = "basalt"


class SlotWriteError(BasaltError):
    """A verified bundle could not be written to a slot (it changed after verification,
    or its basalt.tar is not a plain tree of the ``basalt`` package). The slot is untouched."""

    kind = ErrorKind.ABORTED


class SlotDirectories:
    """The slots of one container-mode node, and its boot state file."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def of_node(cls, node_dir: Path) -> SlotDirectories:
        return cls(node_dir / "slots")

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def where(self) -> str:
        """Where the boot state is kept, for messages."""
        return str(self.state_path)

    # -- the boot state ----------------------------------------------------------------------
    def load(self) -> BootState | None:
        """The stored state; None before the first boot. Raises BootEntryError when unreadable."""
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return None
        return state_from_json(text, str(self.state_path))

    def save(self, state: BootState) -> None:
        write_atomic(self.state_path, state_to_json(state))

    # -- slot contents -----------------------------------------------------------------------
    def directory(self, name: SlotName) -> Path:
        return self.root / name.value

    def python_path(self, name: SlotName) -> Path | None:
        """The source tree to put first on PYTHONPATH, when the slot holds one."""
        tree = self.directory(name) / PYTHON_DIR
        return tree if (tree / PACKAGE / "__init__.py").is_file() else None

    def runs_installed(self, slot: Slot) -> bool:
        """Slot a without a directory: the Basalt the node was installed with."""
        return slot.name is SlotName.A and not self.directory(slot.name).exists()

    def missing(self, slot: Slot) -> str | None:
        """Why ``slot``'s image cannot run (its files are gone), or None."""
        if self.python_path(slot.name) is None and not self.runs_installed(slot):
            return f"its files are missing from {self.directory(slot.name)}"
        return None

    def write(self, name: SlotName, bundle: VerifiedBundle) -> None:
        """Write a verified tar bundle to slot ``name``: whole, or not at all.

        Every member is copied from where verification found it, once the bundle's seal
        shows the file unchanged since (:func:`unchanged`); a bundle that changed after
        verification is refused. The old slot directory is replaced only once the new one
        is complete and synced.
        """
        if bundle.form != "tar" or bundle.layout is None:
            raise SlotWriteError(f"{bundle.source}: only tar bundles can be written to a slot")
        self.root.mkdir(parents=True, exist_ok=True)
        temp = self.root / f".{name.value}.tmp"
        shutil.rmtree(temp, ignore_errors=True)  # left by a crash during an earlier write
        temp.mkdir()
        try:
            _copy_verified(bundle, temp)
            if bundle.manifest.file(BASALT_TREE) is not None:
                _unpack_tree(temp / BASALT_TREE, temp / PYTHON_DIR)
            _sync_tree(temp)
            self._replace(temp, self.directory(name))
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise

    def _replace(self, temp: Path, target: Path) -> None:
        old = self.root / f".{target.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(temp, target)
        _fsync_dir(self.root)
        shutil.rmtree(old, ignore_errors=True)

    # -- staged upgrades ---------------------------------------------------------------------
    @property
    def staged_bundle(self) -> Path:
        return self.root / STAGED_DIR / STAGED_BUNDLE

    def stage(self, upload: Path) -> None:
        """Keep an uploaded bundle for the next boot (moved, or copied across filesystems)."""
        keep_copy(upload, self.staged_bundle)

    def staged(self) -> Path | None:
        return self.staged_bundle if self.staged_bundle.is_file() else None

    def clear_staged(self) -> None:
        shutil.rmtree(self.root / STAGED_DIR, ignore_errors=True)


# -- writing a slot -------------------------------------------------------------------------------


def unchanged(bundle: VerifiedBundle, fd: int) -> None:
    """SlotWriteError unless ``fd`` (the bundle's file, opened again) is the file that was
    verified, unchanged since: its bytes are then copied without hashing them again."""
    assert bundle.layout is not None
    changed = bundle.layout.seal.broken(fd)
    if changed is not None:
        raise SlotWriteError(
            f"{bundle.source} changed after it was verified: {changed}",
            hint="upgrade again: the bundle is received and verified anew",
        )


def _copy_verified(bundle: VerifiedBundle, target: Path) -> None:
    """Copy the bundle's members (manifest, signature, payload) to ``target``."""
    assert bundle.layout is not None
    with open(bundle.source, "rb") as source:
        unchanged(bundle, source.fileno())
        for name, extent in bundle.layout.extents.items():
            with open(target / name, "wb") as out:
                try:
                    copy_range(source.fileno(), extent.offset, extent.size, out.fileno())
                except EOFError as exc:
                    raise SlotWriteError(f"{bundle.source}: {name} is cut short: {exc}") from None
        unchanged(bundle, source.fileno())
    if (target / MANIFEST_NAME).read_bytes() != bundle.manifest_bytes:
        raise SlotWriteError(f"{bundle.source} changed after it was verified: {MANIFEST_NAME}")


def _tree_problem(member: tarfile.TarInfo) -> str | None:
    parts = PurePosixPath(member.name).parts
    if not parts or parts[0] != PACKAGE or member.name.startswith("/") or ".." in parts:
        return f"{member.name!r} is outside the {PACKAGE}/ package"
    if not (member.isreg() or member.isdir()):
        return f"{member.name!r} is not a regular file or directory"
    return None


def _unpack_tree(tar_path: Path, target: Path) -> None:
    """Unpack basalt.tar: the ``basalt`` package only, regular files and directories only."""

    def only_the_package(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        problem = _tree_problem(member)
        if problem is not None:
            raise SlotWriteError(
                f"{BASALT_TREE}: {problem}",
                hint="build container bundles with python -m basalt.provision.bundle_from_tree",
            )
        return tarfile.data_filter(member, dest)

    target.mkdir()
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            tar.extractall(target, filter=only_the_package)
    except tarfile.TarError as exc:
        raise SlotWriteError(f"{BASALT_TREE} cannot be unpacked: {exc}") from None
    if not (target / PACKAGE / "__init__.py").is_file():
        raise SlotWriteError(f"{BASALT_TREE} holds no {PACKAGE}/__init__.py")


def _sync_tree(top: Path) -> None:
    """fsync every file and directory of a freshly written tree.

    An unpacked slot has hundreds of small files; their fsyncs run on a few threads so
    that the filesystem can commit them together instead of one journal commit each.
    """
    paths = []
    for directory, _, files in os.walk(top):
        paths += [os.path.join(directory, name) for name in files]
        paths.append(directory)
    with ThreadPoolExecutor(max_workers=_SYNC_THREADS) as pool:
        list(pool.map(_fsync_path, paths))


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep_copy(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` durably: a temp file, fsync, rename, fsync of the dir."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, temp)
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, target)
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
