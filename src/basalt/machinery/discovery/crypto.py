"""The keys of discovery, the sealing of records and the proof a request carries.

Every node of a cluster holds the cluster's ``id`` and ``secret`` (``ClusterConfig``, 32
random bytes each). From them, HKDF-SHA256 (input key = the secret, salt = the id bytes)
derives three independent keys, one per ``info`` label:

* ``basalt discovery v1 signing`` → a 32-byte Ed25519 seed: the **signing key**. Its
  public key identifies the cluster to the service: the **wire cluster id** is
  ``hex(sha256(public_key))``. The service can check a presented public key against the
  wire id; the wire id gives neither the public key nor, of course, the seed.
* ``basalt discovery v1 data`` → 32 bytes: the **data key** (AES-256-GCM). A sealed
  record is ``0x01 || nonce (12 random bytes) || ciphertext+tag``, with associated data
  ``"basalt discovery v1 data" 0x00 wire-id 0x00 affiliate-id``: a record moved to another
  affiliate or cluster does not open.
* ``basalt discovery v1 endpoint`` → 64 bytes: the **endpoint key** (AES-SIV, 512 bits).
  Sealing is deterministic (associated data ``"basalt discovery v1 endpoint"`` and the
  wire id), so equal addresses give equal ciphertext and the service de-duplicates them
  without reading them.

**The proof.** Every request carries ``Proof(public_key, timestamp, nonce, signature)``:

    message = "basalt-discovery-v1alpha1-proof" 0x00
              || field(method) || field(wire id) || field(affiliate id)
              || field(payload digest) || field(timestamp) || field(nonce)
    field(x) = len(x) as 4 bytes big-endian || x
    signature = Ed25519(signing key, message)

``method`` is the RPC's name in ASCII (``AffiliateUpdate``, ``AffiliateDelete``, ``List``,
``Watch``); the wire id is its 64 ASCII hex digits; the affiliate id is UTF-8 (empty for
``List`` and ``Watch``); the timestamp is Unix seconds as 8 bytes big-endian (signed);
the nonce is 16 random bytes. The payload digest is ``sha256(b"")`` except for
``AffiliateUpdate``, where it is ``sha256(field(data) || ttl as 4 bytes big-endian ||
count of endpoints as 4 bytes big-endian || field(endpoint)...)`` (:func:`update_digest`).

The service accepts a proof when ``hex(sha256(public_key))`` is the wire id, the
signature verifies, the timestamp is within ``WINDOW`` seconds of its clock, and it has not
seen the nonce for that cluster within the window (:class:`NonceCache`). The brief this
replaces used an HMAC key that the service learnt from a first request; a signature keeps
the service (its memory, its snapshots, a plaintext hop) from ever holding a key that can
write records — see docs/adr/0022-discovery.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import (
    DiscoveryAuthError,
    DiscoveryDataError,
    DiscoveryLimitError,
    DiscoveryRequestError,
)

Method = Literal["AffiliateUpdate", "AffiliateDelete", "List", "Watch"]
METHODS: tuple[Method, ...] = ("AffiliateUpdate", "AffiliateDelete", "List", "Watch")

#: Seconds a proof's timestamp may be off the service's clock, either way.
WINDOW = 300
NONCE_SIZE = 16
SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
#: The longest affiliate id (UTF-8 bytes).
AFFILIATE_ID_MAX = 64

_PROOF_DOMAIN = b"basalt-discovery-v1alpha1-proof\x00"
_DATA_AAD = b"basalt discovery v1 data"
_ENDPOINT_AAD = b"basalt discovery v1 endpoint"
_DATA_VERSION = 1
_GCM_NONCE = 12
EMPTY_DIGEST = hashlib.sha256(b"").digest()
_WIRE_ID = re.compile(r"^[0-9a-f]{64}$")


def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _derive(secret: bytes, salt: bytes, label: str, size: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=size, salt=salt, info=label.encode()).derive(
        secret
    )


def wire_id_of(public_key: bytes) -> str:
    """The wire cluster id that ``public_key`` stands for: hex sha256 of its 32 bytes."""
    return hashlib.sha256(public_key).hexdigest()


def is_wire_id(text: str) -> bool:
    """Whether ``text`` has the form of a wire cluster id (64 lower-case hex digits)."""
    return bool(_WIRE_ID.match(text))


def check_affiliate_id(affiliate_id: str) -> None:
    """Refuse an affiliate id that is empty, longer than 64 UTF-8 bytes, or holds a
    control character (it appears in logs and errors)."""
    raw = affiliate_id.encode()
    if not raw or len(raw) > AFFILIATE_ID_MAX:
        raise DiscoveryRequestError(
            f"affiliate id is {len(raw)} bytes; it must be 1-{AFFILIATE_ID_MAX} bytes",
            hint="derive it from the machine's identity, e.g. a hash of its node id",
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in affiliate_id):
        raise DiscoveryRequestError(
            "affiliate id holds a control character", hint="use printable characters only"
        )


def update_digest(data: bytes, endpoints: Sequence[bytes], ttl_seconds: int) -> bytes:
    """The payload digest of an ``AffiliateUpdate`` (what its proof signs)."""
    parts = [_field(data), struct.pack(">II", ttl_seconds, len(endpoints))]
    parts.extend(_field(e) for e in endpoints)
    return hashlib.sha256(b"".join(parts)).digest()


def proof_message(
    method: str, cluster_id: str, affiliate_id: str, digest: bytes, timestamp: int, nonce: bytes
) -> bytes:
    """The canonical bytes a proof signs (see the module's docstring)."""
    return _PROOF_DOMAIN + b"".join(
        (
            _field(method.encode()),
            _field(cluster_id.encode()),
            _field(affiliate_id.encode()),
            _field(digest),
            _field(struct.pack(">q", timestamp)),
            _field(nonce),
        )
    )


@dataclass(frozen=True)
class Proof:
    """What a request carries to show that its sender holds the cluster secret."""

    public_key: bytes
    timestamp: int
    nonce: bytes
    signature: bytes = field(repr=False)


@dataclass(frozen=True)
class ClusterKeys:
    """A cluster's discovery keys, derived from its id and secret. ``repr`` shows only
    the wire id."""

    wire_id: str
    public_key: bytes = field(repr=False)
    _signing: Ed25519PrivateKey = field(repr=False)
    _data: AESGCM = field(repr=False)
    _endpoint: AESSIV = field(repr=False)

    @classmethod
    def from_secret(cls, cluster_id: bytes, secret: bytes) -> ClusterKeys:
        """Derive the keys from the raw cluster id and secret (32 bytes each)."""
        if len(secret) < 16:
            raise DiscoveryDataError(
                f"the cluster secret is {len(secret)} bytes; discovery needs at least 16",
                hint="use the ClusterConfig's secret (32 random bytes)",
            )
        seed = _derive(secret, cluster_id, "basalt discovery v1 signing", 32)
        signing = Ed25519PrivateKey.from_private_bytes(seed)
        public = signing.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(
            wire_id=wire_id_of(public),
            public_key=public,
            _signing=signing,
            _data=AESGCM(_derive(secret, cluster_id, "basalt discovery v1 data", 32)),
            _endpoint=AESSIV(_derive(secret, cluster_id, "basalt discovery v1 endpoint", 64)),
        )

    @classmethod
    def from_config(cls, cluster_id_b64: str, secret_b64: str) -> ClusterKeys:
        """Derive the keys from ``ClusterConfig.id`` and ``.secret`` (base64)."""
        try:
            cluster_id = base64.b64decode(cluster_id_b64, validate=True)
            secret = base64.b64decode(secret_b64, validate=True)
        except (binascii.Error, ValueError):
            raise DiscoveryDataError(
                "the cluster id or secret is not valid base64",
                hint="pass ClusterConfig.id and ClusterConfig.secret as they are",
            ) from None
        return cls.from_secret(cluster_id, secret)

    # -- records ---------------------------------------------------------------------------
    def _data_aad(self, affiliate_id: str) -> bytes:
        return b"\x00".join((_DATA_AAD, self.wire_id.encode(), affiliate_id.encode()))

    def seal_data(self, affiliate_id: str, plaintext: bytes) -> bytes:
        """Encrypt an affiliate's data for ``affiliate_id`` (a fresh random nonce)."""
        nonce = os.urandom(_GCM_NONCE)
        sealed = self._data.encrypt(nonce, plaintext, self._data_aad(affiliate_id))
        return bytes([_DATA_VERSION]) + nonce + sealed

    def open_data(self, affiliate_id: str, blob: bytes) -> bytes:
        """Decrypt what :meth:`seal_data` made; DiscoveryDataError when it was changed,
        belongs to another affiliate or cluster, or is not sealed data at all."""
        if len(blob) < 1 + _GCM_NONCE + 16 or blob[0] != _DATA_VERSION:
            raise DiscoveryDataError(
                f"cluster {self.wire_id[:12]}: affiliate {affiliate_id!r}: the record is not "
                "sealed discovery data (wrong version or too short)",
                hint="the record is ignored; it was not written by a node of this cluster",
            )
        nonce, sealed = blob[1 : 1 + _GCM_NONCE], blob[1 + _GCM_NONCE :]
        try:
            return self._data.decrypt(nonce, sealed, self._data_aad(affiliate_id))
        except InvalidTag:
            raise DiscoveryDataError(
                f"cluster {self.wire_id[:12]}: affiliate {affiliate_id!r}: the record does not "
                "open with this cluster's key (changed in transit or at rest, or sealed for "
                "another affiliate)",
                hint="the record is ignored; the node that owns it rewrites it on its next refresh",
            ) from None

    def seal_endpoint(self, address: str) -> bytes:
        """Encrypt one address deterministically (equal addresses, equal bytes)."""
        return self._endpoint.encrypt(address.encode(), [_ENDPOINT_AAD, self.wire_id.encode()])

    def open_endpoint(self, blob: bytes) -> str:
        """Decrypt what :meth:`seal_endpoint` made; DiscoveryDataError when changed."""
        try:
            raw = self._endpoint.decrypt(blob, [_ENDPOINT_AAD, self.wire_id.encode()])
            return raw.decode()
        except (InvalidTag, ValueError):
            raise DiscoveryDataError(
                f"cluster {self.wire_id[:12]}: an endpoint does not open with this cluster's "
                "key (changed, or sealed by another cluster)",
                hint="the endpoint is ignored",
            ) from None

    # -- proofs ----------------------------------------------------------------------------
    def proof(
        self,
        method: Method,
        affiliate_id: str = "",
        digest: bytes = EMPTY_DIGEST,
        *,
        now: float | None = None,
        nonce: bytes | None = None,
    ) -> Proof:
        """A proof for one request (``digest``: :func:`update_digest` for an update)."""
        timestamp = int(time.time() if now is None else now)
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        message = proof_message(method, self.wire_id, affiliate_id, digest, timestamp, nonce)
        return Proof(self.public_key, timestamp, nonce, self._signing.sign(message))


# -- verification (the service's side) ------------------------------------------------------
AuthFailure = Literal["key", "signature", "stale", "replay", "malformed"]


class ProofRefused(DiscoveryAuthError):
    """A proof the service refuses; ``reason`` says why (for metrics, never sent)."""

    def __init__(self, reason: AuthFailure, message: str) -> None:
        super().__init__(
            message,
            hint="check that the node uses this cluster's id and secret and that its clock "
            f"is within {WINDOW // 60} minutes of the service's",
        )
        self.reason: AuthFailure = reason


def verify_proof(
    proof: Proof,
    *,
    method: Method,
    cluster_id: str,
    affiliate_id: str,
    digest: bytes,
    now: float,
    window: int = WINDOW,
) -> None:
    """Raise ProofRefused unless ``proof`` shows the cluster secret for this request.

    The replay check is separate (:class:`NonceCache`): do it after this, so that a
    forged request cannot fill the cache. Every refusal says the same to the caller
    ("the proof was refused"); the reason is kept for the service's metrics only.
    """
    refused = "the request's proof of the cluster secret was refused"
    if (
        len(proof.public_key) != PUBLIC_KEY_SIZE
        or len(proof.nonce) != NONCE_SIZE
        or len(proof.signature) != SIGNATURE_SIZE
    ):
        raise ProofRefused("malformed", refused + " (malformed proof)")
    if abs(proof.timestamp - now) > window:
        raise ProofRefused("stale", refused + " (timestamp outside the window)")
    if wire_id_of(proof.public_key) != cluster_id:
        raise ProofRefused("key", refused)
    message = proof_message(method, cluster_id, affiliate_id, digest, proof.timestamp, proof.nonce)
    try:
        Ed25519PublicKey.from_public_bytes(proof.public_key).verify(proof.signature, message)
    except (InvalidSignature, ValueError):
        raise ProofRefused("signature", refused) from None


class NonceCache:
    """The nonces of accepted proofs, each kept until its timestamp leaves the window, so
    that a captured request cannot be sent again. At ``capacity`` the cache refuses new
    proofs rather than forget a nonce early (forgetting would allow a replay)."""

    def __init__(self, capacity: int = 200_000, window: int = WINDOW) -> None:
        self.capacity = capacity
        self.window = window
        self._seen: OrderedDict[tuple[str, bytes], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        # Insertion order is close to timestamp order; stop at the first one still live
        # and let a few stragglers wait for the next sweep.
        while self._seen:
            key, expires = next(iter(self._seen.items()))
            if expires >= now:
                break
            del self._seen[key]

    def check(self, cluster_id: str, proof: Proof, now: float) -> None:
        """Record the proof's nonce; ProofRefused("replay") if it was seen."""
        self._expire(now)
        key = (cluster_id, proof.nonce)
        if key in self._seen:
            raise ProofRefused(
                "replay", "the request's proof of the cluster secret was refused (replayed)"
            )
        if len(self._seen) >= self.capacity:
            raise DiscoveryLimitError(
                f"the service's replay cache is full ({self.capacity} recent requests)",
                hint="try again in a few seconds",
            )
        self._seen[key] = proof.timestamp + self.window + 1

    def entries(self) -> list[tuple[str, bytes, int]]:
        """(cluster id, nonce, forget after) of every nonce held (a service's snapshot
        keeps them, so that a restart does not reopen the window to replays)."""
        return [(cluster, nonce, expires) for (cluster, nonce), expires in self._seen.items()]

    def restore(self, cluster_id: str, nonce: bytes, expires: int, now: float) -> None:
        """Put back one of :meth:`entries` (dropped when its time has passed)."""
        if expires >= now and len(self._seen) < self.capacity:
            self._seen[(cluster_id, nonce)] = expires


__all__ = [
    "AFFILIATE_ID_MAX",
    "EMPTY_DIGEST",
    "METHODS",
    "WINDOW",
    "ClusterKeys",
    "Method",
    "NonceCache",
    "Proof",
    "ProofRefused",
    "check_affiliate_id",
    "is_wire_id",
    "proof_message",
    "update_digest",
    "verify_proof",
    "wire_id_of",
]
