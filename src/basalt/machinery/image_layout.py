"""Where things are inside a Basalt image: the paths the imager creates and machined
relies on. One place, so that the builder and the agent cannot disagree."""

from __future__ import annotations

__all__ = [
    "EXTENSIONS_DIR",
    "GENERATED_ETC_FILES",
    "IMAGE_MODULES",
    "IMAGE_MOUNT_DIRECTORIES",
    "IMAGE_MOUNT_FILES",
    "IMAGE_MOUNT_POINTS",
    "OVERLAY_DIRECTORIES",
    "SCHEMATIC_FILE",
    "STARTUP_BUNDLE",
]

#: Where the initramfs puts the extensions, relative to the root (a read-only tmpfs).
EXTENSIONS_DIR = "usr/lib/basalt/extensions"
#: The schematic the image was built from, in :data:`EXTENSIONS_DIR`.
SCHEMATIC_FILE = "schematic.json"

#: The byte code machined imports before its API opens, in one file
#: (basalt.machined.startup_bundle).
STARTUP_BUNDLE = "/usr/lib/basalt/startup.bundle"

#: Root directories that system extensions may provide files in (``provides`` in their
#: manifests): empty in the image; machined mounts a read-only overlay of the
#: extensions' copies (and the image's own, empty directory) on each one that any
#: extension fills. ``/usr/local/bin/kubelet`` is how Kubernetes reaches a node.
OVERLAY_DIRECTORIES = ("usr/local/bin", "usr/local/sbin", "usr/local/lib", "opt/cni/bin")

#: Files below /etc that the agent generates (in /run/basalt/etc) and bind-mounts
#: read-only over the image's own.
GENERATED_ETC_FILES = ("hostname", "hosts", "resolv.conf")

#: Directories the read-only image must contain for the agent to mount over them.
IMAGE_MOUNT_DIRECTORIES = (
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "var",
    "system",
    "etc/kubernetes",
    "etc/cni",
    *OVERLAY_DIRECTORIES,
)
#: Files the image must contain for the agent to bind its generated ones over them.
IMAGE_MOUNT_FILES = tuple(f"etc/{name}" for name in GENERATED_ETC_FILES)
#: Everything the image must contain for the agent to mount over it.
IMAGE_MOUNT_POINTS = IMAGE_MOUNT_DIRECTORIES + IMAGE_MOUNT_FILES

#: The kernel modules the machine needs once the root is mounted (virtio-net: the
#: initramfs loads only what reaches the root), one name a line; the imager writes it
#: and PID 1 loads them with their dependencies before the network controller starts.
IMAGE_MODULES = "usr/lib/basalt/modules.load"
