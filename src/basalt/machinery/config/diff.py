"""What changed between two configs, what a change needs, and a readable diff.

:data:`LIVE` lists the (kind, field path prefix) pairs a running node applies without a
reboot; any other change needs one. The list is deliberately explicit: a new field is
reboot-only until someone makes it live here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import field_where, format_path
from ..yamlio import dump_document
from .bundle import ConfigBundle, document_to_raw
from .redact import redact_document

LIVE: tuple[tuple[str, str], ...] = (
    ("HostnameConfig", ""),
    ("ResolverConfig", ""),
    ("TimeSyncConfig", ""),
    ("SysctlConfig", ""),
    ("LinkConfig", ""),
    ("EtcFileConfig", ""),
    ("EnvironmentConfig", ""),
    ("LoggingConfig", ""),
    ("ImageVerificationConfig", ""),
    ("UpdateConfig", ""),
    ("DiscoveryConfig", ""),
    ("MachineConfig", "ca"),  # rotate-ca: new certificates from the next handshake on
    ("MachineConfig", "acceptedCAs"),
    ("MachineConfig", "crossSignedCA"),
    ("MachineConfig", "certSANs"),
    ("MachineConfig", "install"),
    ("MachineConfig", "kubelet"),
    ("MachineConfig", "features"),
    ("ClusterConfig", "etcd.extraArgs"),
    ("ClusterConfig", "etcd.advertisedSubnets"),
)


@dataclass(frozen=True)
class Change:
    """One changed value: ``document`` (``LinkConfig(eth0)``) and field ``path``."""

    document: str
    path: str
    needs_reboot: bool

    @property
    def where(self) -> str:
        return field_where(self.document, self.path)


def _kind(document: str) -> str:
    return document.split("(", 1)[0]


def needs_reboot(document: str, path: str) -> bool:
    kind = _kind(document)
    for live_kind, prefix in LIVE:
        if kind != live_kind:
            continue
        if not prefix or path == prefix or path.startswith((f"{prefix}.", f"{prefix}[")):
            return False
    return True


def _leaves(old: Any, new: Any, loc: tuple[str | int, ...]) -> Iterator[tuple[str | int, ...]]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if old.get(key) != new.get(key):
                yield from _leaves(old.get(key), new.get(key), (*loc, key))
    elif old != new:
        yield loc


def _by_name(bundle: ConfigBundle) -> dict[str, dict[str, Any]]:
    return {d.display_name: document_to_raw(d) for d in bundle.documents}


def config_changes(old: ConfigBundle, new: ConfigBundle) -> list[Change]:
    """Every changed value, in document order; added or removed documents count whole."""
    before, after = _by_name(old), _by_name(new)
    changes = []
    for name in list(before) + [n for n in after if n not in before]:
        if name not in before or name not in after:
            changes.append(Change(name, "", needs_reboot(name, "")))
            continue
        for loc in _leaves(before[name], after[name], ()):
            path = format_path(loc)
            changes.append(Change(name, path, needs_reboot(name, path)))
    return changes


def unified_diff(old: ConfigBundle, new: ConfigBundle) -> str:
    """A unified diff per changed document (``a/Kind`` -> ``b/Kind``). Secret fields show
    as ``(secret)`` and, where they differ, ``(secret, changed)``: never their values."""
    before, after = _by_name(old), _by_name(new)
    out: list[str] = []
    for name in list(before) + [n for n in after if n not in before]:
        a: list[str] = []
        b: list[str] = []
        if name in before:
            a = dump_document(redact_document(before[name])).splitlines(keepends=True)
        if name in after:
            redacted = redact_document(after[name], before.get(name, {}))
            b = dump_document(redacted).splitlines(keepends=True)
        if a != b:
            out.extend(difflib.unified_diff(a, b, f"a/{name}", f"b/{name}"))
    return "".join(out)
