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
and which upgrade is pending (installed, not yet marked good).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basalt.machinery.boot.assessment import SlotName
from basalt.machinery.errors import BasaltError

MAGIC = b"BSLTMETA"
FORMAT = 1
#: magic, format, sequence, payload length, sha256
_HEADER = struct.Struct(">8sIQI32s")
#: Where the second copy starts; each copy holds at most this many bytes.
SECOND_COPY = 512 * 1024
MAX_PAYLOAD = 64 * 1024
OFFSETS = (0, SECOND_COPY)


class MetaError(BasaltError):
    """META cannot be read or written (no such partition, I/O error, record too large)."""


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
        return cls(reasons, pending, sequence)


def _digest(sequence: int, payload: bytes) -> bytes:
    head = MAGIC + struct.pack(">IQI", FORMAT, sequence, len(payload))
    return hashlib.sha256(head + payload).digest()


def encode_copy(record: MetaRecord, sequence: int) -> bytes:
    payload = record.payload()
    if len(payload) > MAX_PAYLOAD:
        raise MetaError(f"META record of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
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


class Meta:
    """The META partition (or, in tests, a file of its size)."""

    def __init__(self, device: Path) -> None:
        self.device = device

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.device, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise MetaError(f"META {self.device}: {exc.strerror}") from None

    def read(self) -> MetaRecord:
        fd = self._open(os.O_RDONLY)
        try:
            return newest(_read_copies(fd))
        except OSError as exc:
            raise MetaError(f"META {self.device}: reading failed: {exc.strerror}") from None
        finally:
            os.close(fd)

    def write(self, record: MetaRecord) -> MetaRecord:
        """Store ``record`` over the older copy; returns it with its new sequence number."""
        fd = self._open(os.O_RDWR)
        try:
            copies = _read_copies(fd)
            current = newest(copies)
            sequence = current.sequence + 1
            # Keep the newest valid copy: overwrite the other one.
            keep = next((i for i, c in enumerate(copies) if c is not None and c == current), None)
            index = 1 if keep == 0 else 0
            data = encode_copy(record, sequence)
            os.pwrite(fd, data, OFFSETS[index])
            os.fsync(fd)
        except OSError as exc:
            raise MetaError(f"META {self.device}: writing failed: {exc.strerror}") from None
        finally:
            os.close(fd)
        return MetaRecord(record.reasons, record.pending, sequence)
