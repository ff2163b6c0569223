"""The bundle manifest: its fields, canonical JSON bytes, and the parser that checks them.

The signature covers the exact manifest bytes, so there is one byte form for a given
manifest: JSON with sorted keys, no whitespace, ASCII only, files sorted by path, no
trailing newline. :func:`parse_manifest` refuses any other spelling of the same data.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The manifest layout this code writes and understands.
FORMAT_VERSION = 1

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})

#: Manifests are small (a few hundred bytes per file); anything bigger is refused unread.
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 4096

#: Architectures by their kernel name (``uname -m``).
ARCHITECTURES = ("x86_64", "aarch64")

#: A Basalt version as it appears in boot entry names: lowercase, no ``+`` (systemd-boot
#: reads the last ``+`` of an entry name as its boot counter) and no ``/``.
VERSION_RE = re.compile(r"[0-9a-z][0-9a-z._~-]{0,63}")
#: A schematic's content id as the imager makes it (a hash, or a short name).
SCHEMATIC_RE = re.compile(r"[0-9a-z][0-9a-z._-]{0,127}")
#: Payload names: flat, portable file names; never ``manifest.*``.
PAYLOAD_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CREATED_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

_FILE_KEYS = frozenset({"path", "size", "sha256"})
_MANIFEST_KEYS = frozenset(
    {"formatVersion", "version", "schematicId", "architecture", "created", "files"}
)


class ManifestFormatError(ValueError):
    """Raised by :func:`parse_manifest`; the bundle code turns it into ImageManifestError."""


@dataclass(frozen=True)
class PayloadFile:
    """One payload file as the manifest lists it."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a bundle claims to be. Trust it only once the signature over it checks out."""

    version: str
    schematic_id: str
    architecture: str
    created: str
    files: tuple[PayloadFile, ...]
    format_version: int = FORMAT_VERSION

    def file(self, path: str) -> PayloadFile | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "formatVersion": self.format_version,
            "version": self.version,
            "schematicId": self.schematic_id,
            "architecture": self.architecture,
            "created": self.created,
            "files": [
                {"path": f.path, "size": f.size, "sha256": f.sha256}
                for f in sorted(self.files, key=lambda f: f.path)
            ],
        }

    def encode(self) -> bytes:
        """The canonical bytes: what is signed and what is stored as ``manifest.json``."""
        return canonical_json(self.to_json())


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII: one byte string per JSON value."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def format_created(moment: dt.datetime) -> str:
    """``2025-01-31T12:00:00Z``: UTC, whole seconds."""
    return moment.astimezone(dt.UTC).strftime(_CREATED_FORMAT)


def created_from_epoch(epoch: str | int | None) -> str:
    """The creation time: ``SOURCE_DATE_EPOCH`` when given (reproducible), else now."""
    if epoch is None or epoch == "":
        return format_created(dt.datetime.now(dt.UTC))
    try:
        seconds = int(epoch)
    except ValueError:
        raise ValueError(f"SOURCE_DATE_EPOCH={epoch!r} is not a number of seconds") from None
    return format_created(dt.datetime.fromtimestamp(seconds, dt.UTC))


def _short(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:37] + "...")


def check_version(value: str) -> str | None:
    """Why ``value`` is not a usable Basalt version, or None when it is."""
    if not VERSION_RE.fullmatch(value):
        return (
            f"version {_short(value)} must be 1-64 of lowercase letters, digits, "
            "'.', '_', '~', '-' (no '+': boot entry names use it for the boot counter)"
        )
    return None


def check_payload_name(value: str) -> str | None:
    """Why ``value`` cannot name a payload file, or None when it can."""
    if value in RESERVED_NAMES:
        return f"{value!r} is reserved for the bundle's own manifest"
    if "/" in value or value.startswith(".."):
        return f"{_short(value)} is not a plain file name (no directories, no '..')"
    if not PAYLOAD_NAME_RE.fullmatch(value):
        return (
            f"{_short(value)} must be 1-128 of letters, digits, '.', '_', '-', "
            "not starting with '.'"
        )
    return None


def _some(names: list[str], limit: int = 3) -> str:
    """A few names for a message, each cut short: the manifest is not trusted yet."""
    shown = ", ".join(n if len(n) <= 40 else n[:37] + "..." for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise ManifestFormatError(problem)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_file(index: int, raw: object) -> PayloadFile:
    where = f"files[{index}]"
    _require(isinstance(raw, Mapping), f"{where} is not an object")
    assert isinstance(raw, Mapping)
    _require(set(raw) == _FILE_KEYS, f"{where} must have exactly the keys path, size, sha256")
    path, size, sha256 = raw["path"], raw["size"], raw["sha256"]
    _require(isinstance(path, str), f"{where}.path is not a string")
    problem = check_payload_name(path)
    _require(problem is None, f"{where}.path: {problem}")
    _require(_is_int(size) and size >= 0, f"{where}.size is not a byte count")
    _require(
        isinstance(sha256, str) and bool(_SHA256_RE.fullmatch(sha256)),
        f"{where}.sha256 is not 64 lowercase hex digits",
    )
    return PayloadFile(path, size, sha256)


def parse_manifest(data: bytes) -> Manifest:
    """Parse and check manifest bytes; raise :class:`ManifestFormatError` saying what is wrong.

    Parsing is not trusting: callers act on the result only after the signature over
    ``data`` has been verified.
    """
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestFormatError(f"not JSON: {exc}") from None
    _require(isinstance(raw, dict), "not a JSON object")
    fmt = raw.get("formatVersion")
    _require(_is_int(fmt), "formatVersion is missing or not a number")
    _require(
        fmt == FORMAT_VERSION,
        f"formatVersion {fmt} is not supported (this tool reads {FORMAT_VERSION})",
    )
    missing = sorted(_MANIFEST_KEYS - set(raw))
    unknown = sorted(set(raw) - _MANIFEST_KEYS)
    _require(not missing, f"missing field(s): {', '.join(missing)}")
    _require(not unknown, f"unknown field(s): {_some(unknown)}")
    version, schematic, arch, created = (
        raw["version"],
        raw["schematicId"],
        raw["architecture"],
        raw["created"],
    )
    _require(isinstance(version, str), "version is not a string")
    problem = check_version(version)
    _require(problem is None, str(problem))
    _require(
        isinstance(schematic, str) and bool(SCHEMATIC_RE.fullmatch(schematic)),
        "schematicId is not a schematic id (lowercase letters, digits, '.', '_', '-')",
    )
    _require(
        isinstance(arch, str) and bool(re.fullmatch(r"[a-z0-9_]{1,32}", arch)),
        "architecture is not an architecture name",
    )
    _require(
        isinstance(created, str) and bool(_CREATED_RE.fullmatch(created)),
        "created is not a UTC time like 2025-01-31T12:00:00Z",
    )
    files = raw["files"]
    _require(isinstance(files, list) and bool(files), "files is not a non-empty list")
    parsed = tuple(_parse_file(i, f) for i, f in enumerate(files))
    paths = [f.path for f in parsed]
    _require(len(set(paths)) == len(paths), "files lists a path twice")
    manifest = Manifest(version, schematic, arch, created, parsed, fmt)
    _require(
        manifest.encode() == data,
        "not in canonical form (sorted keys, no whitespace, files sorted by path, no newline)",
    )
    return manifest
