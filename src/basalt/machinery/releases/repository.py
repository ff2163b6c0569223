"""A release repository: a directory any static web server can serve, signed with TUF.

    DIR/metadata/   root.json (+ 1.root.json ...), targets.json, snapshot.json,
                    timestamp.json, and one delegated targets role per channel
                    (alpha.json, beta.json, stable.json)
    DIR/targets/    CHANNEL/basalt-VERSION-ARCH.tar: the signed upgrade bundles
    DIR/keys/       one private key per role (mode 0600). root.pem is only needed to
                    change keys or channels: keep it offline once the repository is made.

Top-level ``targets`` signs nothing but the delegations: each channel's role (its own
key) lists that channel's bundles under ``CHANNEL/``. A bundle stays signed with its
Ed25519 image key, so a node checks both TUF's hashes and the bundle's signature. Each
target says in ``custom`` its version and architecture; ``yanked`` marks a release no
node may take (a dead end); ``via: W`` makes a node below W reach this release only
through release W (see :mod:`.graph`).

Expiry: root a year, targets and channels 90 days, snapshot 7 days, timestamp 1 day;
``timestamp`` re-signs the short-lived ones. Versions of every role only go up, so a
replayed (older) snapshot or timestamp is refused by clients.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BasaltError, ErrorKind
from ..fileio import write_atomic

CHANNELS = ("alpha", "beta", "stable")
TOP_ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRY = {
    "root": dt.timedelta(days=365),
    "targets": dt.timedelta(days=90),
    "channel": dt.timedelta(days=90),
    "snapshot": dt.timedelta(days=7),
    "timestamp": dt.timedelta(days=1),
}


class ReleaseError(BasaltError):
    kind = ErrorKind.FAILED_PRECONDITION


@dataclass(frozen=True)
class Release:
    channel: str
    path: str
    version: str
    arch: str
    length: int
    sha256: str
    yanked: bool
    via: str

    @classmethod
    def from_target(cls, channel: str, path: str, target: Any) -> Release:
        """A channel role's target entry (python-tuf's ``TargetFile``) as a release."""
        custom = target.custom
        return cls(
            channel,
            path,
            str(custom.get("version", "")),
            str(custom.get("arch", "")),
            target.length,
            target.hashes.get("sha256", ""),
            bool(custom.get("yanked", False)),
            str(custom.get("via", "")),
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _expires(role: str) -> dt.datetime:
    return _now() + EXPIRY["channel" if role not in EXPIRY else role]


class Repository:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.metadata = directory / "metadata"
        self.targets = directory / "targets"
        self.keys = directory / "keys"

    # -- keys and files ------------------------------------------------------------------
    def _signer(self, role: str) -> Any:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from securesystemslib.signer import CryptoSigner

        path = self.keys / f"{role}.pem"
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            raise ReleaseError(
                f"{path}: the {role} key is not here",
                hint="root.pem is kept offline: bring it back for this step"
                if role == "root"
                else "run the command where the repository's keys are",
            ) from None
        return CryptoSigner(load_pem_private_key(pem, None))

    def _load(self, role: str) -> Any:
        from tuf.api.metadata import Metadata

        path = self.metadata / f"{role}.json"
        if not path.exists() and (role in CHANNELS or not (self.metadata / "root.json").exists()):
            raise ReleaseError(
                f"{self.directory} has no {role} metadata",
                hint="make a repository with 'basaltctl release init DIR'"
                if role == "root" or not (self.metadata / "root.json").exists()
                else f"channels here: {', '.join(self.channels())}",
            )
        return Metadata.from_file(str(path))

    def _save(self, role: str, metadata: Any) -> None:
        from tuf.api.serialization.json import JSONSerializer

        data = metadata.to_bytes(JSONSerializer(compact=False))
        write_atomic(self.metadata / f"{role}.json", data)
        if role == "root":
            write_atomic(self.metadata / f"{metadata.signed.version}.root.json", data)

    def channels(self) -> list[str]:
        targets = self._load("targets").signed
        assert targets.delegations is not None and targets.delegations.roles is not None
        return list(targets.delegations.roles)

    def _check_channel(self, channel: str) -> None:
        known = self.channels()
        if channel not in known:
            raise ReleaseError(
                f"channel {channel!r} is not in {self.directory} (channels: {', '.join(known)})",
                hint="channels are made with the repository: release init --channel NAME",
            )

    # -- init ----------------------------------------------------------------------------
    @classmethod
    def init(cls, directory: Path, channels: Sequence[str] = CHANNELS) -> Repository:
        """A new repository with fresh keys for every role and channel."""
        from securesystemslib.signer import CryptoSigner
        from tuf.api.metadata import (
            DelegatedRole,
            Delegations,
            Metadata,
            MetaFile,
            Root,
            Snapshot,
            Targets,
            Timestamp,
        )

        repo = cls(directory)
        if (repo.metadata / "root.json").exists():
            raise ReleaseError(
                f"{directory} holds a release repository already",
                hint="publish to it, or pick a new directory",
            )
        for name in channels:
            if not name.replace("-", "").isalnum() or name in TOP_ROLES:
                raise ReleaseError(f"channel name {name!r}: letters, digits and '-' only")
        for path in (repo.metadata, repo.targets, repo.keys):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(repo.keys, 0o700)
        signers: dict[str, Any] = {}
        for role in (*TOP_ROLES, *channels):
            signer = CryptoSigner.generate_ed25519()
            write_atomic(repo.keys / f"{role}.pem", signer.private_bytes, mode=0o600)
            signers[role] = signer
        root = Root(expires=_expires("root"), consistent_snapshot=False)
        for role in TOP_ROLES:
            root.add_key(signers[role].public_key, role)
        delegations = Delegations(
            keys={signers[c].public_key.keyid: signers[c].public_key for c in channels},
            roles={
                c: DelegatedRole(c, [signers[c].public_key.keyid], 1, True, [f"{c}/*"])
                for c in channels
            },
        )
        documents: dict[str, Any] = {
            "root": Metadata(root),
            "targets": Metadata(Targets(expires=_expires("targets"), delegations=delegations)),
        }
        for channel in channels:
            documents[channel] = Metadata(Targets(expires=_expires(channel)))
        meta = {f"{r}.json": MetaFile(1) for r in ("targets", *channels)}
        documents["snapshot"] = Metadata(Snapshot(expires=_expires("snapshot"), meta=meta))
        documents["timestamp"] = Metadata(
            Timestamp(expires=_expires("timestamp"), snapshot_meta=MetaFile(1))
        )
        for role, document in documents.items():
            document.sign(signers[role])
            repo._save(role, document)
        for channel in channels:
            (repo.targets / channel).mkdir(exist_ok=True)
        return repo

    # -- the snapshot chain --------------------------------------------------------------
    def _commit(self, changed: dict[str, Any]) -> None:
        """Sign and write ``changed`` channel roles, then a new snapshot and timestamp."""
        from tuf.api.metadata import MetaFile

        snapshot = self._load("snapshot")
        for role, document in changed.items():
            document.signed.version += 1
            document.signed.expires = _expires(role)
            document.signatures.clear()
            document.sign(self._signer(role))
            self._save(role, document)
            snapshot.signed.meta[f"{role}.json"] = MetaFile(document.signed.version)
        snapshot.signed.version += 1
        snapshot.signed.expires = _expires("snapshot")
        snapshot.signatures.clear()
        snapshot.sign(self._signer("snapshot"))
        self._save("snapshot", snapshot)
        self.timestamp()

    def timestamp(self) -> int:
        """Re-sign the timestamp (it expires after a day): run it from cron."""
        from tuf.api.metadata import MetaFile

        snapshot = self._load("snapshot")
        timestamp = self._load("timestamp")
        timestamp.signed.version += 1
        timestamp.signed.expires = _expires("timestamp")
        timestamp.signed.snapshot_meta = MetaFile(snapshot.signed.version)
        timestamp.signatures.clear()
        timestamp.sign(self._signer("timestamp"))
        self._save("timestamp", timestamp)
        return int(timestamp.signed.version)

    # -- releases ------------------------------------------------------------------------
    def releases(self, channel: str | None = None) -> list[Release]:
        found = []
        for name in [channel] if channel else self.channels():
            self._check_channel(name)
            for path, target in self._load(name).signed.targets.items():
                found.append(Release.from_target(name, path, target))
        return found

    def publish(
        self, bundle: Path, version: str, arch: str, channel: str, via: str = ""
    ) -> Release:
        """Add a bundle (already verified by its signature) to ``channel``."""
        from tuf.api.metadata import TargetFile

        self._check_channel(channel)
        path = f"{channel}/basalt-{version}-{arch}.tar"
        document = self._load(channel)
        if path in document.signed.targets:
            raise ReleaseError(
                f"{version} ({arch}) is in {channel} already",
                hint="a published release never changes; publish a new version",
            )
        target = self.targets / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle, target.with_suffix(".tar.part"))
        os.replace(target.with_suffix(".tar.part"), target)
        entry = TargetFile.from_file(path, str(target), ["sha256"])
        entry.unrecognized_fields["custom"] = {
            "version": version,
            "arch": arch,
            **({"via": via} if via else {}),
        }
        document.signed.targets[path] = entry
        self._commit({channel: document})
        return next(r for r in self.releases(channel) if r.path == path)

    def _find(self, channel: str, version: str) -> list[tuple[str, Any]]:
        self._check_channel(channel)
        found = [
            (path, target)
            for path, target in self._load(channel).signed.targets.items()
            if target.custom.get("version") == version
        ]
        if not found:
            have = sorted({r.version for r in self.releases(channel)}) or ["none"]
            raise ReleaseError(f"{version} is not in channel {channel} (there: {', '.join(have)})")
        return found

    def promote(self, version: str, source: str, destination: str) -> list[Release]:
        """Put ``version`` of ``source`` into ``destination`` too (same bundle, same hashes)."""
        from tuf.api.metadata import TargetFile

        self._check_channel(destination)
        found = self._find(source, version)
        document = self._load(destination)
        added = []
        for path, target in found:
            if target.custom.get("yanked"):
                raise ReleaseError(f"{version} is yanked in {source}: it cannot be promoted")
            new_path = destination + path.removeprefix(source)
            if new_path in document.signed.targets:
                raise ReleaseError(f"{version} is in {destination} already")
            (self.targets / new_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.targets / path, self.targets / new_path)
            entry = TargetFile(target.length, dict(target.hashes), new_path)
            entry.unrecognized_fields["custom"] = dict(target.custom)
            document.signed.targets[new_path] = entry
            added.append(new_path)
        self._commit({destination: document})
        return [r for r in self.releases(destination) if r.path in added]

    def yank(self, version: str, channels: Sequence[str] = ()) -> list[Release]:
        """Mark ``version`` a dead end in ``channels`` (default: every channel it is in)."""
        chosen = list(channels) or [
            c for c in self.channels() if any(r.version == version for r in self.releases(c))
        ]
        if not chosen:
            raise ReleaseError(f"{version} is in no channel")
        changed = {}
        for channel in chosen:
            document = self._load(channel)
            for path, _target in self._find(channel, version):
                document.signed.targets[path].unrecognized_fields["custom"]["yanked"] = True
            changed[channel] = document
        self._commit(changed)
        return [r for c in chosen for r in self.releases(c) if r.version == version]
