"""Upgrades and rollbacks of a node's A/B slots, in container mode and on metal.

An upgrade is boring on purpose, and refuses before it changes anything::

    receive the bundle into EPHEMERAL (bounded) -> verify it (signature by a trusted key,
    architecture, every payload file, the payload this platform needs) -> on control
    planes, the etcd quorum pre-check -> cordon/drain through the Kubernetes API when
    the kubelet runs, or say why not -> write the inactive slot and record Install ->
    reboot into it, on trial -> once a slot is good again (gates passed, or a fallback),
    uncordon what the upgrade cordoned

On the first boot of a slot on trial, the health gates (:mod:`basalt.machined.gates`)
decide: passed marks it good; failed or timed out reboots, and once its tries run out
the launcher boots the previous slot. The decisions are the pure model's
(:mod:`basalt.machinery.boot.assessment`); this package is the I/O around them: the slot
storage, events, the ``BootStatus`` resource. Container mode keeps slots in
``<node-dir>/slots`` (:mod:`basalt.machinery.boot.slots`) and its launcher plays the
firmware; a metal node booted from a Basalt disk keeps them in its ``BASALT-A``/``-B``
partitions, the ESP's systemd-boot entries and META
(:mod:`basalt.machined.boot.metal_slots`), and systemd-boot is the firmware.

One job a module: :mod:`.upgrader` (slots, boot state, assessment, the steps),
:mod:`.receive` (bundles in), :mod:`.drain` (Kubernetes), :mod:`.slots` (where the slots
are), :mod:`.jobs` (requests and refusals).
"""

from .jobs import (
    BOOTED_SLOT_ENV,
    MAX_BUNDLE_BYTES,
    NO_KUBERNETES,
    UPLOAD_DIR,
    BundleUploadError,
    DowngradeRefusedError,
    UpgradeJob,
    UpgradeOptions,
    UpgradeRefusedError,
)
from .upgrader import Upgrader

__all__ = [
    "BOOTED_SLOT_ENV",
    "MAX_BUNDLE_BYTES",
    "NO_KUBERNETES",
    "UPLOAD_DIR",
    "BundleUploadError",
    "DowngradeRefusedError",
    "UpgradeJob",
    "UpgradeOptions",
    "UpgradeRefusedError",
    "Upgrader",
]
