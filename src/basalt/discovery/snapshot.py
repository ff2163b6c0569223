"""The service's state on disk: ``STATE/discovery.json``, so that a restart loses nothing.

Written atomically (temporary file, fsync, rename) every ``--snapshot-interval`` seconds
when something changed, and once more at shutdown; read at start, dropping the records
whose time ran out meanwhile. It holds ciphertext and public data only — the sealed
records and the nonces of recent proofs (so that a restart does not let a captured
request be replayed) — no key; it is still written mode 0600.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

from basalt.machinery.discovery.crypto import NonceCache
from basalt.machinery.errors import BasaltError
from basalt.machinery.fileio import write_atomic

from .state import Record, Registry

log = logging.getLogger("basalt.discovery")

FORMAT = 1
NAME = "discovery.json"


class SnapshotError(BasaltError):
    """The snapshot file cannot be read; the message names it and what is wrong."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def capture(registry: Registry, nonces: NonceCache, now: float) -> dict[str, Any]:
    """The state as plain data (cheap: records are immutable, taken by reference); encode
    it with :func:`encode`, off the event loop if large."""
    return {
        "format": FORMAT,
        "saved": now,
        "records": list(registry.records()),
        "nonces": nonces.entries(),
    }


def encode(state: dict[str, Any]) -> bytes:
    records: list[tuple[str, str, Record]] = state["records"]
    body = {
        "format": state["format"],
        "saved": state["saved"],
        "records": [
            [cluster, affiliate, _b64(r.data), [_b64(e) for e in r.endpoints], r.expires]
            for cluster, affiliate, r in records
        ],
        "nonces": [[cluster, _b64(nonce), expires] for cluster, nonce, expires in state["nonces"]],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def save(path: Path, data: bytes) -> None:
    write_atomic(path, data, mode=0o600)


def load(path: Path, registry: Registry, nonces: NonceCache, now: float) -> tuple[int, int]:
    """Fill ``registry`` and ``nonces`` from ``path``; (records kept, records expired).
    No file: (0, 0)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0, 0
    hint = f"move {path} aside to start empty (nodes publish again within their refresh)"
    try:
        body = json.loads(raw)
        if body.get("format") != FORMAT:
            raise SnapshotError(
                f"{path}: snapshot format {body.get('format')!r}, this service reads {FORMAT}",
                hint=hint,
            )
        kept = expired = 0
        for cluster, affiliate, data, endpoints, expires in body["records"]:
            record = Record(
                base64.b64decode(data),
                tuple(base64.b64decode(e) for e in endpoints),
                float(expires),
            )
            if registry.restore(str(cluster), str(affiliate), record, now):
                kept += 1
            else:
                expired += 1
        for cluster, nonce, expires in body.get("nonces", []):
            nonces.restore(str(cluster), base64.b64decode(nonce), int(expires), now)
    except SnapshotError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SnapshotError(f"{path}: not a discovery snapshot ({exc})", hint=hint) from None
    return kept, expired
