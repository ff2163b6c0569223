"""KubernetesAssets/assets: the node's Kubernetes files, rendered from its config.

Rendering makes new keys and certificates, so it happens only when what the assets are
made from changes (the inputs' fingerprint), not on every run nor on every boot: a
ledger next to the secrets records the fingerprint and every file written, with its
digest. While the fingerprint matches and the files are intact they are kept as they
are. The ledger also says which files the node wrote before, so files that a new config
no longer wants are removed, and nothing else is ever touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from basalt.machinery.fileio import write_atomic
from basalt.machinery.kubernetes import paths
from basalt.machinery.resources import KubernetesAssetFile, KubernetesAssetsSpec

from ..runtime import Controller, ResourceStore

if TYPE_CHECKING:
    from basalt.machinery.kubernetes import AssetInputs

    from ..node import Node

log = logging.getLogger(__name__)

RESOURCE_ID = "assets"
#: Only files below these may be written or removed on the ledger's word.
_OWNED_PREFIXES = (paths.SECRETS_DIR + "/", "/etc/kubernetes/")
#: Directories made owner-only before any secret is written into them.
_PRIVATE_DIRS = (paths.SECRETS_ROOT, paths.SECRETS_DIR)


@dataclass
class Ledger:
    """What was rendered last: the inputs' fingerprint and each file's sha256.

    A fingerprint of None marks a render in progress: its files list then holds the old
    and the new files, so that a crash in between still lets the next run clean up.
    """

    fingerprint: str | None = None
    files: dict[str, str] = field(default_factory=dict)


def _sha256(data: bytes) -> str:
    import hashlib  # with a config: not the start-up's (it loads libcrypto)

    return hashlib.sha256(data).hexdigest()


def _owned(path: str) -> bool:
    return posixpath.normpath(path) == path and path.startswith(_OWNED_PREFIXES)


def _host(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def read_ledger(root: Path) -> Ledger:
    try:
        data = json.loads(_host(root, paths.LEDGER).read_text())
        files = {str(p): str(d) for p, d in data["files"].items() if _owned(str(p))}
        fingerprint = data.get("fingerprint")
        return Ledger(str(fingerprint) if fingerprint else None, files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return Ledger()


def _write_ledger(root: Path, ledger: Ledger) -> None:
    text = json.dumps({"fingerprint": ledger.fingerprint, "files": ledger.files}, indent=1)
    write_atomic(_host(root, paths.LEDGER), text, mode=0o600)


def _intact(root: Path, files: dict[str, str]) -> bool:
    for path, digest in files.items():
        try:
            if _sha256(_host(root, path).read_bytes()) != digest:
                return False
        except OSError:
            return False
    return bool(files)


def _private_dirs(root: Path) -> None:
    for directory in _PRIVATE_DIRS:
        target = _host(root, directory)
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o700)


def sync_assets(root: Path, inputs: AssetInputs) -> tuple[dict[str, str], bool]:
    """Make the files under ``root`` match ``inputs``; returns (path -> sha256, rendered).

    ``rendered`` is False when the files on disk were already right and were kept.
    Blocking: run it in a thread.
    """
    fingerprint = inputs.fingerprint()
    before = read_ledger(root)
    if before.fingerprint == fingerprint and _intact(root, before.files):
        return before.files, False
    from basalt.machinery.kubernetes.render import render

    assets = render(inputs)
    _private_dirs(root)
    _write_ledger(root, Ledger(None, before.files | dict.fromkeys(assets, "")))
    for path, asset in assets.items():
        write_atomic(_host(root, path), asset.data, mode=asset.mode)
    for path in sorted(set(before.files) - set(assets)):
        with contextlib.suppress(FileNotFoundError):
            _host(root, path).unlink()
    files = {path: _sha256(asset.data) for path, asset in assets.items()}
    _write_ledger(root, Ledger(fingerprint, files))
    return files, True


def assets_spec(inputs: AssetInputs, files: dict[str, str]) -> KubernetesAssetsSpec:
    listed = []
    for path, digest in sorted(files.items()):
        secret = paths.is_secret(path)
        listed.append(
            KubernetesAssetFile(
                path=path,
                mode=f"{paths.mode_for(path):04o}",
                secret=secret,
                sha256="" if secret else digest,
            )
        )
    return KubernetesAssetsSpec(
        kubernetes_version=inputs.version, machine_type=inputs.machine_type, files=listed
    )


class KubernetesAssetsController(Controller):
    name = "kubernetes-assets"
    inputs = ("MachineConfigs",)
    outputs = ("KubernetesAssets",)

    def __init__(self, node: Node) -> None:
        self.node = node
        self._fingerprint: str | None = None
        self._reported: str | None = None

    async def reconcile(self, store: ResourceStore) -> None:
        node = self.node
        if node.config is None:
            return
        from basalt.machinery.kubernetes import AssetInputs, KubernetesAssetError

        inputs = AssetInputs.from_bundle(
            node.config,
            address=node.address,
            hostname=node.hostname,
            host_root=str(node.paths.root),
        )
        fingerprint = inputs.fingerprint()
        if fingerprint == self._fingerprint:
            return
        try:
            files, rendered = await asyncio.to_thread(sync_assets, node.paths.root, inputs)
        except KubernetesAssetError as exc:
            if self._reported != fingerprint:  # once per config, not once per retry
                self._reported = fingerprint
                node.events.publish(
                    "kubernetes", f"Kubernetes assets not rendered: {exc}", actor=self.name
                )
            raise
        self._fingerprint = fingerprint
        store.put("KubernetesAssets", RESOURCE_ID, assets_spec(inputs, files), owner=self.name)
        what = "rendered" if rendered else "kept"
        node.events.publish(
            "kubernetes",
            f"Kubernetes assets {what}: {len(files)} files for Kubernetes {inputs.version}",
            actor=self.name,
            files=str(len(files)),
        )
        log.info("kubernetes assets %s (%d files)", what, len(files))
        if rendered:
            await self._restart_kubelet()

    async def _restart_kubelet(self) -> None:
        """A running kubelet reads its config at start only: restart it on a new one."""
        supervisor = self.node.supervisor
        if any(s.id == "kubelet" and s.state == "running" for s in supervisor.statuses()):
            await supervisor.restart("kubelet")
