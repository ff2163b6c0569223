"""The payload files of a bundle, by name, and which of them each platform mode needs."""

from __future__ import annotations

from .errors import BundleInputError

#: Payload names that `basaltctl bundle create` uses for the boot assets.
KERNEL = "kernel"
INITRAMFS = "initramfs"
ROOTFS = "rootfs.squashfs"
#: A tar of the ``basalt`` Python package: what a container-mode slot runs.
BASALT_TREE = "basalt.tar"
#: The bundle's chunk index (:mod:`.chunks`): what lets an upload leave out what a node holds.
CHUNKS_NAME = "chunks.json"

#: The payload a bundle needs to be installable on each platform mode: metal boots a
#: kernel, an initramfs and a root filesystem; a container-mode node runs the Basalt
#: source tree (the launcher puts it first on PYTHONPATH).
PLATFORM_PAYLOAD: dict[str, tuple[str, ...]] = {
    "metal": (KERNEL, INITRAMFS, ROOTFS),
    "container": (BASALT_TREE,),
}


def required_payload(platform: str) -> tuple[str, ...]:
    """The payload names a bundle for ``platform`` (``metal`` or ``container``) must hold."""
    try:
        return PLATFORM_PAYLOAD[platform]
    except KeyError:
        known = ", ".join(PLATFORM_PAYLOAD)
        raise BundleInputError(
            f"unknown platform {platform!r}", hint=f"choose one of {known}"
        ) from None
