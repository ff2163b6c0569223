"""META: the small boot record that entry names cannot hold, in two checksummed copies.

The META partition (1 MiB, docs/adr/0011) holds two copies of one record, at offset 0
and at :data:`SECOND_COPY`. Each copy is a header (magic, format, sequence number,
payload length, sha256 over the header fields and the payload) followed by the payload,
canonical JSON. A write goes to the copy that does *not* hold the newest valid record,
with the next sequence number, and is fsynced: a power cut tears at most the copy being
written, and a read then finds the other, complete one. A read takes the valid copy with
the highest sequence number; a fresh (zeroed) partition reads as the empty record.

The record says why each slot stopped being the one that boots (its last failed health
gate, or a rollback: ``BootState`` reasons, which systemd-boot entry names cannot carry),
and which upgrade is pending (installed, not yet marked good). Beside them, a separate
``keys`` map holds the operator's own keys (``basaltctl meta write``): Basalt never
reads them, and a boot writer never changes them (:meth:`Meta.write` keeps the stored
keys; :meth:`Meta.set_key` and :meth:`Meta.delete_key` keep the boot fields). Names
Basalt owns are refused (:func:`check_key`). Every write, whoever makes it, is one
read-modify-write under one lock per device (a thread lock plus ``flock``), so the boot
code and the API never interleave. An older Basalt (after a rollback) reads the record
and ignores ``keys``; its own writes then drop them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from basalt.machinery.boot.assessment import SlotName
from basalt.machinery.errors import BasaltError, ErrorKind, InvalidRequestError

MAGIC = b"BSLTMETA"
FORMAT = 1
#: magic, format, sequence, payload length, sha256
_HEADER = struct.Struct(">8sIQI32s")
#: Where the second copy starts; each copy holds at most this many bytes.
SECOND_COPY = 512 * 1024
MAX_PAYLOAD = 64 * 1024
OFFSETS = (0, SECOND_COPY)


#: A user key: starts with a letter or digit; letters, digits, ``.``, ``_``, ``-``.
KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_KEY_LENGTH = 128
#: A value's UTF-8 bytes; the whole record must also fit :data:`MAX_PAYLOAD`.
MAX_VALUE_BYTES = 8 * 1024
#: Names Basalt owns, compared case-insensitively: the record's own fields (a key of that
#: name would read as if it were Basalt's), and every name Basalt gives its own state.
RESERVED_NAMES = frozenset({"reasons", "pending", "keys", "sequence", "format", "magic"})
RESERVED_PREFIXES = ("basalt.", "basalt-", "basalt_")
RESERVED_HINT = (
    f"Basalt owns the names {', '.join(sorted(RESERVED_NAMES))} and every name starting "
    f"with {', '.join(RESERVED_PREFIXES)} (any case); choose another, e.g. 'site.rack'"
)


class MetaError(BasaltError):
    """META cannot be read or written (no such partition, I/O error, record too large)."""


class MetaFullError(MetaError):
    """The record with this change would not fit a META copy: nothing was written."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


class MetaKeyError(InvalidRequestError):
    """A user key is malformed, too long, reserved by Basalt, or its value too large."""


def reserved(key: str) -> bool:
    """Whether ``key`` is a name Basalt owns (:data:`RESERVED_NAMES`, ``RESERVED_PREFIXES``)."""
    lowered = key.lower()
    return lowered in RESERVED_NAMES or lowered.startswith(RESERVED_PREFIXES)


def check_key(key: str) -> None:
    """Raise MetaKeyError unless ``key`` is a well-formed key the operator may own."""
    if not key:
        raise MetaKeyError("META key is empty", hint="name a key, e.g. 'site.rack'")
    if len(key) > MAX_KEY_LENGTH:
        raise MetaKeyError(
            f"META key {key[:32]!r}... is {len(key)} characters; at most {MAX_KEY_LENGTH}",
            hint="use a shorter name",
        )
    if not KEY_PATTERN.match(key):
        raise MetaKeyError(
            f"META key {key!r} has characters outside A-Z a-z 0-9 . _ - "
            "(or does not start with a letter or digit)",
            hint="e.g. 'site.rack' or 'owner-team'",
        )
    if reserved(key):
        raise MetaKeyError(f"META key {key!r} is reserved by Basalt", hint=RESERVED_HINT)


def check_value(key: str, value: str) -> None:
    """Raise MetaKeyError when ``value`` is larger than :data:`MAX_VALUE_BYTES`."""
    size = len(value.encode())
    if size > MAX_VALUE_BYTES:
        raise MetaKeyError(
            f"the value of META key {key!r} is {size} bytes; at most {MAX_VALUE_BYTES}",
            hint="keep large data elsewhere (a config document, a file on /var) and "
            "store a reference to it",
        )


@dataclass(frozen=True)
class PendingUpgrade:
    """An install that has not passed its health gates yet."""

    slot: SlotName
    version: str
    generation: int


@dataclass(frozen=True)
class MetaRecord:
    """What META holds: a reason per slot, the pending upgrade, and its sequence number."""

    reasons: dict[SlotName, str] = field(default_factory=dict)
    pending: PendingUpgrade | None = None
    sequence: int = 0
    #: The operator's keys (never Basalt's): see :func:`check_key`.
    keys: dict[str, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        document: dict[str, Any] = {
            "reasons": {slot.value: text for slot, text in sorted(self.reasons.items())},
            "pending": None
            if self.pending is None
            else {
                "slot": self.pending.slot.value,
                "version": self.pending.version,
                "generation": self.pending.generation,
            },
        }
        if self.keys:  # absent when empty: a record without keys has the bytes it always had
            document["keys"] = dict(sorted(self.keys.items()))
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_payload(cls, data: bytes, sequence: int) -> MetaRecord:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        reasons = {SlotName(k): str(v) for k, v in (raw.get("reasons") or {}).items()}
        pending_raw = raw.get("pending")
        pending = None
        if pending_raw is not None:
            pending = PendingUpgrade(
                SlotName(pending_raw["slot"]),
                str(pending_raw["version"]),
                int(pending_raw["generation"]),
            )
        keys_raw = raw.get("keys") or {}
        if not isinstance(keys_raw, dict):
            raise ValueError("keys is not an object")
        keys = {str(k): str(v) for k, v in keys_raw.items()}
        return cls(reasons, pending, sequence, keys)


def _digest(sequence: int, payload: bytes) -> bytes:
    head = MAGIC + struct.pack(">IQI", FORMAT, sequence, len(payload))
    return hashlib.sha256(head + payload).digest()


def encode_copy(record: MetaRecord, sequence: int) -> bytes:
    payload = record.payload()
    if len(payload) > MAX_PAYLOAD:
        raise MetaFullError(
            f"the META record would be {len(payload)} bytes; a copy holds at most "
            f"{MAX_PAYLOAD} (keys: {len(record.keys)}, "
            f"{sum(len(k) + len(v.encode()) for k, v in record.keys.items())} bytes)",
            hint="delete keys you no longer need (basaltctl meta delete KEY) or store "
            "smaller values",
        )
    header = _HEADER.pack(MAGIC, FORMAT, sequence, len(payload), _digest(sequence, payload))
    return header + payload


def decode_copy(data: bytes) -> MetaRecord | None:
    """The record in one copy, or None when it is blank, torn or not a META copy."""
    if len(data) < _HEADER.size:
        return None
    magic, fmt, sequence, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC or fmt != FORMAT or length > MAX_PAYLOAD:
        return None
    payload = data[_HEADER.size : _HEADER.size + length]
    if len(payload) != length or _digest(sequence, payload) != digest:
        return None
    try:
        return MetaRecord.from_payload(payload, sequence)
    except (ValueError, KeyError, TypeError):
        return None


def _read_copies(fd: int) -> list[MetaRecord | None]:
    return [decode_copy(os.pread(fd, _HEADER.size + MAX_PAYLOAD, o)) for o in OFFSETS]


def newest(copies: list[MetaRecord | None]) -> MetaRecord:
    valid = [c for c in copies if c is not None]
    return max(valid, key=lambda c: c.sequence) if valid else MetaRecord()


#: One lock per META device (by its real path) for the threads of this process; ``flock``
#: on the device serialises processes too.
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _device_lock(device: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(os.path.realpath(device), threading.Lock())


class Meta:
    """The META partition (or, in tests, a file of its size).

    Every write is a read-modify-write of the newest record under :meth:`locked`: the boot
    writers (:meth:`write`) own ``reasons`` and ``pending``, the API (:meth:`set_key`,
    :meth:`delete_key`) owns ``keys``; neither changes the other's part.
    """

    def __init__(self, device: Path) -> None:
        self.device = device

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.device, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise MetaError(f"META {self.device}: {exc.strerror}") from None

    @contextlib.contextmanager
    def locked(self, flags: int = os.O_RDWR) -> Iterator[int]:
        """The device open, this process's threads and other processes kept out."""
        with _device_lock(self.device):
            fd = self._open(flags)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield fd
            finally:
                os.close(fd)  # releases the flock

    def read(self) -> MetaRecord:
        try:
            with self.locked(os.O_RDONLY) as fd:
                return newest(_read_copies(fd))
        except OSError as exc:
            raise MetaError(f"META {self.device}: reading failed: {exc.strerror}") from None

    def write(self, record: MetaRecord) -> MetaRecord:
        """Store ``record``'s reasons and pending upgrade over the older copy, keeping the
        stored keys; returns the record as written, with its new sequence number."""
        return self._modify(lambda current: replace(record, keys=current.keys))

    def set_key(self, key: str, value: str) -> MetaRecord:
        """Store the operator's ``key`` (checked: :func:`check_key`, :func:`check_value`)."""
        check_key(key)
        check_value(key, value)
        return self._modify(lambda current: replace(current, keys={**current.keys, key: value}))

    def delete_key(self, key: str) -> bool:
        """Remove the operator's ``key``; False (and nothing written) when it is not there."""
        check_key(key)
        removed = False

        def change(current: MetaRecord) -> MetaRecord | None:
            nonlocal removed
            if key not in current.keys:
                return None
            removed = True
            return replace(current, keys={k: v for k, v in current.keys.items() if k != key})

        self._modify(change)
        return removed

    def _modify(self, change: Callable[[MetaRecord], MetaRecord | None]) -> MetaRecord:
        """Read the newest record, apply ``change`` and write the result (None: nothing)
        over the copy that does not hold the newest valid record, then fsync."""
        try:
            with self.locked() as fd:
                copies = _read_copies(fd)
                current = newest(copies)
                wanted = change(current)
                if wanted is None:
                    return current
                sequence = current.sequence + 1
                data = encode_copy(wanted, sequence)  # MetaFullError before any write
                # Keep the newest valid copy: overwrite the other one.
                keep = next(
                    (i for i, c in enumerate(copies) if c is not None and c == current), None
                )
                index = 1 if keep == 0 else 0
                os.pwrite(fd, data, OFFSETS[index])
                os.fsync(fd)
        except OSError as exc:
            raise MetaError(f"META {self.device}: writing failed: {exc.strerror}") from None
        return replace(wanted, sequence=sequence)
