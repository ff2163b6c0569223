"""``manifest.sig``: an Ed25519 signature over the exact manifest bytes, and its key id.

The file is canonical JSON: ``{"algorithm":"ed25519","keyId":HEX,"signature":HEX}``.
It is not itself signed; a wrong key id only selects a key, and the signature check
that follows decides.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from .keys import key_id
from .manifest import canonical_json

ALGORITHM = "ed25519"
_KEY_ID_RE = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_RE = re.compile(r"[0-9a-f]{128}")


class SignatureFormatError(ValueError):
    """``manifest.sig`` is not a signature file; the bundle code reports ImageSignatureError."""


@dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes

    def encode(self) -> bytes:
        return canonical_json(
            {"algorithm": ALGORITHM, "keyId": self.key_id, "signature": self.signature.hex()}
        )


def sign(manifest: bytes, signing_key: ed25519.Ed25519PrivateKey) -> bytes:
    """The ``manifest.sig`` bytes for ``manifest`` (Ed25519 is deterministic: same in, same out)."""
    return Signature(key_id(signing_key), signing_key.sign(manifest)).encode()


def parse_signature(data: bytes) -> Signature:
    """Parse ``manifest.sig`` or raise :class:`SignatureFormatError` saying what is wrong."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SignatureFormatError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict) or set(raw) != {"algorithm", "keyId", "signature"}:
        raise SignatureFormatError("must be an object with algorithm, keyId and signature")
    if raw["algorithm"] != ALGORITHM:
        raise SignatureFormatError(f"algorithm {raw['algorithm']!r} is not {ALGORITHM!r}")
    kid, sig = raw["keyId"], raw["signature"]
    if not isinstance(kid, str) or not _KEY_ID_RE.fullmatch(kid):
        raise SignatureFormatError("keyId is not 64 lowercase hex digits")
    if not isinstance(sig, str) or not _SIGNATURE_RE.fullmatch(sig):
        raise SignatureFormatError("signature is not 128 lowercase hex digits")
    return Signature(kid, bytes.fromhex(sig))


def signature_valid(
    manifest: bytes, signature: Signature, public_key: ed25519.Ed25519PublicKey
) -> bool:
    try:
        public_key.verify(signature.signature, manifest)
    except InvalidSignature:
        return False
    return True
