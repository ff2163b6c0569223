"""Signed update bundles for the slot tests, verified as a node verifies them, and the
install step of an upgrade as :meth:`basalt.machined.upgrade.Upgrader.install` makes it,
for both slot stores (container directories and metal slots)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Protocol

from basalt.machinery.boot import BootState, Install, Slot, SlotName, apply
from basalt.machinery.images import (
    VerifiedBundle,
    create_bundle,
    load_signing_key,
    required_payload,
    verification_key,
    verify_bundle,
)

ARCH = "x86_64"


def verified(bundle: Path, keypair: tuple[str, str], platform: str) -> VerifiedBundle:
    """``bundle`` verified against the pair's public key for ``platform``'s payload."""
    keys = [verification_key(keypair[1], "test")]
    return verify_bundle(bundle, keys, ARCH, required=required_payload(platform))


def metal_bundle(
    directory: Path, keypair: tuple[str, str], version: str, root: bytes
) -> VerifiedBundle:
    """A signed, verified metal bundle: ``kernel-VERSION``, an initramfs and ``root``."""
    src = directory / f"payload-{version}"
    src.mkdir()
    files = {
        "kernel": b"kernel-" + version.encode(),
        "initramfs": b"initrd",
        "rootfs.squashfs": root,
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    out = directory / f"{version}.tar"
    key = load_signing_key(keypair[0])
    create_bundle(out, {n: src / n for n in files}, version, "default", ARCH, key)
    return verified(out, keypair, "metal")


Change = Literal["written", "replaced", "grown"]
#: The ways a verified bundle's file can change before it is written to a slot, and what
#: the slot writer says about each.
CHANGES: dict[Change, str] = {
    "written": "it was written to",
    "replaced": "it was replaced by another file",
    "grown": "its size changed",
}


def change(bundle: VerifiedBundle, how: Change) -> None:
    """Change the bundle's file after it was verified: one byte of its last payload file
    flipped in place, the file replaced by such a copy, or bytes appended."""
    path = bundle.source
    data = bytearray(path.read_bytes())
    assert bundle.layout is not None
    last = max(bundle.layout.extents.values(), key=lambda extent: extent.offset)
    data[last.offset + last.size // 2] ^= 0xFF
    if how == "written":
        before = path.stat()
        with open(path, "r+b") as handle:
            handle.write(data)
        # A write in the clock tick of the last verified byte keeps the timestamps (the
        # seal is a tripwire, see FileSeal): make it a write of a second later.
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    elif how == "replaced":
        other = path.with_name(path.name + ".new")
        other.write_bytes(data)
        os.replace(other, path)
    else:
        with open(path, "ab") as handle:
            handle.write(b"\0" * 512)


class SlotStore(Protocol):
    def load(self) -> BootState | None: ...
    def save(self, state: BootState) -> None: ...
    def write(self, name: SlotName, bundle: VerifiedBundle) -> None: ...


def install(slots: SlotStore, bundle: VerifiedBundle) -> SlotName:
    """What Upgrader.install does: the model picks the slot; an image already there loses
    its boot entry first (a half-written slot never boots); the slot is written; the new
    state is saved. Returns the slot written."""
    state = slots.load()
    assert state is not None
    outcome = apply(state, Install(bundle.version))
    assert not outcome.refused and outcome.slot is not None, outcome.message
    if state.slot(outcome.slot).version is not None:
        slots.save(state.with_slot(Slot(outcome.slot)))
    slots.write(outcome.slot, bundle)
    slots.save(outcome.state)
    return outcome.slot
