"""Errors about upgrade bundles, named by where the fault is.

:class:`ImageVerificationError` and its subclasses are raised by :func:`verify_bundle`,
one class per check, in the order the checks run (see ``docs/adr/0007``). Every one
means the bundle was refused and nothing was written. :class:`SigningKeyError` and
:class:`BundleInputError` are about what the caller gave, not about a bundle.
"""

from __future__ import annotations

from ..errors import BasaltError, ErrorKind


class SigningKeyError(BasaltError):
    """A signing (private) or verification (public) key could not be loaded.

    Raised for a file that is not PEM, or holds a key that is not Ed25519.
    Give the ``.key`` file made by ``basaltctl gen signing-key`` (or its ``.pub``).
    """


class BundleInputError(BasaltError):
    """A bundle cannot be created from the inputs given (a bad name, version or file).

    Nothing was written; fix the named input and run again.
    """


class ImageVerificationError(BasaltError):
    """A bundle was refused: one of the checks of :func:`verify_bundle` failed.

    The subclass says which check; the message names the bundle and what was wrong,
    and the hint what to do. Nothing was written or changed.
    """

    kind = ErrorKind.INVALID_ARGUMENT

    check: str = "bundle"

    def __init__(self, source: str, problem: str, *, hint: str) -> None:
        super().__init__(f"{source}: {self.check} check failed: {problem}", hint=hint)
        self.source = source
        self.problem = problem


class ImageFormatError(ImageVerificationError):
    """The bundle is neither a directory nor an uncompressed tar file, or the tar file
    holds something unsafe (an absolute path, ``..``, a link, a device) or a name twice."""

    check = "format"


class ImageManifestError(ImageVerificationError):
    """``manifest.json`` is missing, too large, not canonical JSON, or not a valid manifest."""

    check = "manifest"


class UnsignedImageError(ImageVerificationError):
    """The bundle has no ``manifest.sig``: nobody vouches for it."""

    check = "signature present"


class UnknownSigningKeyError(ImageVerificationError):
    """``manifest.sig`` names a key that is not among the trusted keys.

    ``key_id`` is the signer's key id, ``trusted`` the ids that would have been accepted.
    """

    check = "signing key trusted"

    def __init__(self, source: str, key_id: str, trusted: list[str]) -> None:
        listed = ", ".join(trusted) if trusted else "(none)"
        super().__init__(
            source,
            f"signed by key {key_id}, which is not trusted; trusted key ids: {listed}",
            hint=(
                "add the signer's public key to ImageVerificationConfig.keys (on a node) "
                "or pass it with --key, or use a bundle signed by a trusted key"
            ),
        )
        self.key_id = key_id
        self.trusted = trusted


class ImageSignatureError(ImageVerificationError):
    """``manifest.sig`` is malformed, or its signature does not match ``manifest.json``:
    the manifest was changed after signing, or the signature was made for another one."""

    check = "signature valid"


class ImageArchitectureError(ImageVerificationError):
    """The bundle was built for another architecture than the node's."""

    check = "architecture"


class ImagePayloadError(ImageVerificationError):
    """A payload file is missing, has another size (truncated) or sha256 (tampered) than
    the signed manifest says, is not a regular file, or is not listed in the manifest.

    ``path`` names the file.
    """

    check = "payload"

    def __init__(self, source: str, path: str, problem: str, *, hint: str) -> None:
        super().__init__(source, f"{path}: {problem}", hint=hint)
        self.path = path
