"""Upgrade bundles: a signed manifest plus payload files, and their verification.

A bundle is a directory or an uncompressed tar file holding ``manifest.json`` (canonical
JSON: format version, Basalt version, schematic id, architecture, creation time, and
every payload file with its size and sha256), ``manifest.sig`` (an Ed25519 signature
over the exact manifest bytes, with the signer's key id) and the payload files.
See ``docs/adr/0007-upgrade-bundles-and-boot-assessment.md``.
"""

from typing import TYPE_CHECKING

from basalt.machinery import lazy

if TYPE_CHECKING:
    from .create import create_bundle
    from .errors import (
        BundleInputError,
        ImageArchitectureError,
        ImageFormatError,
        ImageManifestError,
        ImagePayloadError,
        ImageSignatureError,
        ImageVerificationError,
        SigningKeyError,
        UnknownSigningKeyError,
        UnsignedImageError,
    )
    from .keys import (
        VerificationKey,
        generate_signing_key,
        key_id,
        load_public_key,
        load_signing_key,
        trusted_keys_from_config,
        verification_key,
    )
    from .manifest import (
        ARCHITECTURES,
        FORMAT_VERSION,
        MANIFEST_NAME,
        SIGNATURE_NAME,
        Manifest,
        PayloadFile,
        parse_manifest,
    )
    from .payload import (
        BASALT_TREE,
        INITRAMFS,
        KERNEL,
        PLATFORM_PAYLOAD,
        ROOTFS,
        required_payload,
    )
    from .signature import parse_signature, sign
    from .verify import Extent, TarLayout, VerifiedBundle, verify_bundle, verify_tar_stream

#: Imported on first use: the boot assessment reads versions (``manifest``) on every boot;
#: keys, signatures and verification (cryptography) only matter during an upgrade.
__getattr__ = lazy.exports(
    __name__,
    {
        "create": ("create_bundle",),
        "payload": (
            "BASALT_TREE",
            "INITRAMFS",
            "KERNEL",
            "PLATFORM_PAYLOAD",
            "ROOTFS",
            "required_payload",
        ),
        "errors": (
            "BundleInputError",
            "Extent",
            "ImageArchitectureError",
            "ImageFormatError",
            "ImageManifestError",
            "ImagePayloadError",
            "ImageSignatureError",
            "ImageVerificationError",
            "SigningKeyError",
            "UnknownSigningKeyError",
            "UnsignedImageError",
        ),
        "keys": (
            "VerificationKey",
            "generate_signing_key",
            "key_id",
            "load_public_key",
            "load_signing_key",
            "trusted_keys_from_config",
            "verification_key",
        ),
        "manifest": (
            "ARCHITECTURES",
            "FORMAT_VERSION",
            "MANIFEST_NAME",
            "SIGNATURE_NAME",
            "Manifest",
            "PayloadFile",
            "parse_manifest",
        ),
        "signature": (
            "parse_signature",
            "sign",
        ),
        "verify": (
            "Extent",
            "TarLayout",
            "TarLayout",
            "VerifiedBundle",
            "verify_bundle",
            "verify_tar_stream",
        ),
    },
)

__all__ = [
    "ARCHITECTURES",
    "BASALT_TREE",
    "FORMAT_VERSION",
    "INITRAMFS",
    "KERNEL",
    "MANIFEST_NAME",
    "PLATFORM_PAYLOAD",
    "ROOTFS",
    "SIGNATURE_NAME",
    "BundleInputError",
    "Extent",
    "ImageArchitectureError",
    "ImageFormatError",
    "ImageManifestError",
    "ImagePayloadError",
    "ImageSignatureError",
    "ImageVerificationError",
    "Manifest",
    "PayloadFile",
    "SigningKeyError",
    "TarLayout",
    "UnknownSigningKeyError",
    "UnsignedImageError",
    "VerificationKey",
    "VerifiedBundle",
    "create_bundle",
    "generate_signing_key",
    "key_id",
    "load_public_key",
    "load_signing_key",
    "parse_manifest",
    "parse_signature",
    "required_payload",
    "sign",
    "trusted_keys_from_config",
    "verification_key",
    "verify_bundle",
    "verify_tar_stream",
]
