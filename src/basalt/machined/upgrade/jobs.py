"""What an upgrade request is as it goes through the ``upgrade`` sequence, and how the
upgrade refuses: the errors, the options, the job, the limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from basalt.machinery.errors import BasaltError, ErrorKind

if TYPE_CHECKING:
    from basalt.machinery.boot import SlotName
    from basalt.machinery.images import VerifiedBundle

#: Bundles larger than this are refused while they are being received.
MAX_BUNDLE_BYTES = 2 << 30
#: Where uploads land (EPHEMERAL: node-owned storage, so the verified file cannot change).
UPLOAD_DIR = "upgrade"
#: What the launcher tells machined (see basalt.provision.launcher).
BOOTED_SLOT_ENV = "BASALT_BOOTED_SLOT"
NO_KUBERNETES = "Kubernetes not running on this node; skipping cordon/drain"


class UpgradeRefusedError(BasaltError):
    """The node cannot upgrade or roll back now; the message says why, nothing changed."""


class DowngradeRefusedError(UpgradeRefusedError):
    """The bundle is older than the running version, and no admin asked for a downgrade."""


class BundleUploadError(BasaltError):
    """The upload itself is unusable (no options first, empty, or too large)."""

    kind = ErrorKind.INVALID_ARGUMENT


@dataclass(frozen=True)
class UpgradeOptions:
    stage: bool = False
    force: bool = False
    no_drain: bool = False
    #: kexec into the new slot when able; False: reboot through the firmware.
    kexec: bool = False
    #: Install a bundle older than the running version (refused otherwise).
    allow_downgrade: bool = False


@dataclass
class UpgradeJob:
    """One upgrade request as it goes through the ``upgrade`` sequence."""

    options: UpgradeOptions
    upload: Path
    #: What verification errors call the bundle: where it came from.
    label: str = "uploaded bundle"
    steps: list[str] = field(default_factory=list)
    verified: VerifiedBundle | None = None
    slot: SlotName | None = None
    message: str = ""
