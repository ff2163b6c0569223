"""Secrets at rest: AES-256-GCM with a key kept outside the database.

``--secrets-key FILE`` (default ``~/.basalt/fleet/secrets.key``, made on first start,
mode 0600). Every replica of one fleet reads the same file. A dump of the database alone
holds only ciphertext: the fleet CA's key, cluster CAs and tokens are sealed with it.
Each sealed value carries the key's id, so a wrong key file is named as such instead of
failing as corrupted data.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from basalt.machinery.errors import BasaltError, ErrorKind
from basalt.machinery.fileio import write_atomic

KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = b"\x01"


class SecretsKeyError(BasaltError):
    kind = ErrorKind.FAILED_PRECONDITION


class SecretBox:
    def __init__(self, key: bytes, source: str = "the secrets key") -> None:
        if len(key) != KEY_BYTES:
            raise SecretsKeyError(
                f"{source}: a secrets key is {KEY_BYTES} bytes, this one is {len(key)}",
                hint="point --secrets-key at the file the fleet made, or at a new one "
                "only for a new database",
            )
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(b"basalt-fleet-key" + key).digest()[:8]
        self.source = source

    @classmethod
    def from_file(cls, path: Path, *, create: bool = False) -> SecretBox:
        """The key in ``path``; with ``create``, a new one when the file does not exist."""
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, os.urandom(KEY_BYTES), mode=0o600)
        try:
            key = path.read_bytes()
        except OSError as exc:
            raise SecretsKeyError(
                f"cannot read the secrets key {path}: {exc.strerror}",
                hint="--secrets-key names the file every replica of this fleet shares",
            ) from None
        return cls(key, source=str(path))

    def seal(self, plaintext: bytes, context: str) -> bytes:
        """Encrypt ``plaintext``; ``context`` (what the value is) is authenticated too, so
        a sealed value moved to another row does not open."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, context.encode())
        return VERSION + self.key_id + nonce + sealed

    def open(self, blob: bytes, context: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        if blob[:1] != VERSION:
            raise SecretsKeyError(f"{context}: not a value sealed by the fleet")
        if blob[1:9] != self.key_id:
            raise SecretsKeyError(
                f"{context} was sealed with another secrets key than {self.source}",
                hint="start the fleet with the --secrets-key file it was first started with",
            )
        nonce = blob[9 : 9 + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[9 + NONCE_BYTES :], context.encode())
        except InvalidTag:
            raise SecretsKeyError(f"{context}: the sealed value was altered") from None
