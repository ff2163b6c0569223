"""The errors the imager raises; each says what to do next."""

from __future__ import annotations

from basalt.machinery.errors import BasaltError


class ImageError(BasaltError):
    """Base of the imager's errors."""


class ImageLockError(ImageError):
    """``image.lock`` is missing, unreadable or does not match what the build needs.

    Run ``basaltctl image lock`` to (re)create it, review the diff and commit it.
    """


class ImageToolError(ImageError):
    """A host tool the build needs (apt-get, dpkg-deb, mksquashfs, pip) failed or is missing.

    The message carries the tool's own output; ``make image-deps`` installs the tools.
    """


class ImageBuildError(ImageError):
    """The build produced something unusable (a library that cannot be resolved, an
    interpreter that cannot import machined, a missing kernel module)."""
