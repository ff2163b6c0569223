"""A node's view of a release channel, through python-tuf's client.

:class:`ChannelReader` refreshes the repository's metadata (starting from the root the
node pins, walking signed root rotations), lists the channel's releases and downloads one
bundle, checked against the length and hashes TUF signed. Metadata is cached in the
node's own directory, so a replayed (older) timestamp or snapshot is refused after the
node has seen a newer one. Every refusal is a :class:`ReleaseFetchError` naming the role
and the reason; nothing on the node changes. Blocking: call it in a thread.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import BasaltError, ErrorKind
from ..fileio import write_atomic
from .repository import Release


class ReleaseFetchError(BasaltError):
    """The repository could not be read, or what it served was not trustworthy."""

    kind = ErrorKind.UNAVAILABLE


class ReleaseRefusedError(ReleaseFetchError):
    """What the repository served failed TUF's checks (expired, replayed, tampered)."""

    kind = ErrorKind.FAILED_PRECONDITION


def _explain(exc: Exception, where: str) -> ReleaseFetchError:
    from tuf.api import exceptions as tuf

    text = str(exc) or type(exc).__name__
    if isinstance(exc, tuf.ExpiredMetadataError):
        return ReleaseRefusedError(
            f"{where}: expired metadata refused: {text}",
            hint="the repository must re-sign it: basaltctl release timestamp DIR",
        )
    if isinstance(exc, tuf.BadVersionNumberError):
        return ReleaseRefusedError(
            f"{where}: replayed (older) metadata refused: {text}",
            hint="the server offers metadata older than this node has seen: a stale "
            "mirror, or an attack; nothing changed",
        )
    if isinstance(exc, tuf.UnsignedMetadataError):
        return ReleaseRefusedError(
            f"{where}: metadata not signed by the keys this node trusts: {text}",
            hint="check UpdateConfig.root: it must be the repository's root",
        )
    if isinstance(exc, tuf.LengthOrHashMismatchError):
        return ReleaseRefusedError(
            f"{where}: what was downloaded does not match what TUF signed: {text}",
            hint="the file on the server was changed after it was published; nothing changed",
        )
    if isinstance(exc, tuf.DownloadError | OSError):
        return ReleaseFetchError(
            f"{where}: cannot reach the repository: {text}",
            hint="check UpdateConfig.repository and the network; the node tries again",
        )
    return ReleaseRefusedError(f"{where}: refused: {type(exc).__name__}: {text}")


class ChannelReader:
    """One channel of a TUF release repository, as one node reads it."""

    def __init__(self, repository: str, root: bytes, directory: Path, channel: str) -> None:
        self.base = repository if repository.endswith("/") else repository + "/"
        self.root = root
        self.directory = directory
        self.channel = channel
        self.metadata = directory / "metadata"
        self.downloads = directory / "downloads"
        self._updater: Any = None

    def _open(self) -> Any:
        from tuf.ngclient import Updater

        for path in (self.metadata, self.downloads):
            path.mkdir(parents=True, exist_ok=True)
        pinned = self.directory / "pinned-root.json"
        if not pinned.exists() or pinned.read_bytes() != self.root:
            # A new pinned root (a config change) starts from nothing cached.
            for cached in self.metadata.glob("*.json"):
                cached.unlink()
            write_atomic(pinned, self.root)
        return Updater(
            str(self.metadata),
            self.base + "metadata/",
            str(self.downloads),
            self.base + "targets/",
            bootstrap=self.root,
        )

    def releases(self) -> list[Release]:
        """Refresh the metadata and list the channel's releases (yanked ones too)."""
        from tuf.api.metadata import Metadata, Targets

        where = f"repository {self.base}"
        try:
            self._updater = self._open()
            self._updater.refresh()
            # Looking a path of the channel up makes the client load and verify the
            # channel's delegated role (and cache it): then read what it verified.
            self._updater.get_targetinfo(f"{self.channel}/.releases")
        except Exception as exc:
            raise _explain(exc, where) from None
        path = self.metadata / f"{self.channel}.json"
        if not path.exists():
            raise ReleaseFetchError(
                f"{where} has no channel {self.channel!r}",
                hint="check UpdateConfig.channel against 'basaltctl release list'",
            )
        role: Metadata[Targets] = Metadata.from_file(str(path))
        return [
            Release.from_target(self.channel, name, target)
            for name, target in role.signed.targets.items()
        ]

    def download(self, release: Release, into: Path) -> Path:
        """The release's bundle at ``into``, its length and hashes checked by TUF (a file
        already there that matches them is kept, not fetched again)."""
        where = f"repository {self.base}, {release.path}"
        if self._updater is None:
            self.releases()
        try:
            info = self._updater.get_targetinfo(release.path)
            if info is None:
                raise ReleaseFetchError(f"{where}: no longer in channel {self.channel}")
            into.parent.mkdir(parents=True, exist_ok=True)
            if self._updater.find_cached_target(info, str(into)) is not None:
                return into  # downloaded before, and still what TUF signed
            partial = into.with_name(into.name + ".part")
            self._updater.download_target(info, str(partial))
            os.replace(partial, into)
        except ReleaseFetchError:
            raise
        except Exception as exc:
            raise _explain(exc, where) from None
        return into
