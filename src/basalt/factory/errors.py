"""The errors the factory raises; each names what was asked for and what to do next.

The HTTP layer turns an error's ``kind`` into a status (not found 404, a state that
refuses 409, a bad request 400, ...); a schematic that does not validate is answered
separately, with every problem by field (see ``routes.schematic_problems``).
"""

from __future__ import annotations

from basalt.machinery.errors import BasaltError, ErrorKind


class FactoryError(BasaltError):
    """Base of the factory's errors."""


class UnknownSchematic(FactoryError):
    """No schematic with this id was posted to this factory."""

    kind = ErrorKind.NOT_FOUND


class UnknownVersion(FactoryError):
    """The factory builds only its own Basalt version; another one was asked for."""

    kind = ErrorKind.NOT_FOUND


class UnknownArtefact(FactoryError):
    """Not one of the files an image has (vmlinuz, initrd.img, disk.raw.zst, ...)."""

    kind = ErrorKind.NOT_FOUND


class NoSigningKey(FactoryError):
    """``bundle.tar`` was asked for, but the factory was started without a signing key."""

    kind = ErrorKind.FAILED_PRECONDITION


class BuildFailed(FactoryError):
    """The image's last build failed; the message carries the build's own error."""

    kind = ErrorKind.FAILED_PRECONDITION


class ExtensionRefused(FactoryError):
    """An uploaded extension is not signed by a key the factory trusts, or not one at all."""

    kind = ErrorKind.INVALID_ARGUMENT


class FactoryUnauthorized(FactoryError):
    """A change (or a secret schematic's image) needs the factory's token."""

    kind = ErrorKind.PERMISSION_DENIED


class RequestTooLarge(FactoryError):
    """A request body over the route's limit (a schematic is a few lines)."""

    kind = ErrorKind.INVALID_ARGUMENT


class FactoryOptionError(FactoryError):
    """The factory cannot start with these options (a key that does not load, ...)."""

    kind = ErrorKind.INVALID_ARGUMENT


class ListenError(BasaltError):
    """A server cannot listen where it was told to."""

    kind = ErrorKind.UNAVAILABLE


__all__ = [
    "BuildFailed",
    "ExtensionRefused",
    "FactoryError",
    "FactoryOptionError",
    "FactoryUnauthorized",
    "ListenError",
    "NoSigningKey",
    "RequestTooLarge",
    "UnknownArtefact",
    "UnknownSchematic",
    "UnknownVersion",
]
