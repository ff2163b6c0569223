"""The support bundle's archive: entries written as they arrive, every text scrubbed of
the cluster's secrets, a record of what each file is and of what could not be collected.

Nothing here talks to a node (:mod:`.support` does): the archive, the scrubber, the
redaction of sensitive resources and the README are plain code, tested on their own.
"""

from __future__ import annotations

import base64
import codecs
import datetime as dt
import json
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from basalt.machinery.config.redact import SECRET, redact_config_text, secret_values

__all__ = [
    "CAPTURED_TYPES",
    "UPGRADE_EVENT_TYPES",
    "Entry",
    "Failure",
    "NodeState",
    "Scrubber",
    "SupportArchive",
    "event_line",
    "node_dir",
    "redact_sensitive_spec",
    "summary",
]

#: Event types that tell the story of upgrades: slots booted, fallbacks, the updater,
#: installs.
UPGRADE_EVENT_TYPES = frozenset({"boot", "update", "install", "upgrade"})
#: Resource types kept in memory while they pass (small), for the boot status and summary.
CAPTURED_TYPES = frozenset({"BootStatuses", "UpdateStatuses", "Members"})

#: A line longer than this is written in pieces (a log without newlines stays bounded).
_MAX_PENDING = 1024 * 1024
#: Pieces of secrets shorter than this are not hunted line by line (PEM footers etc.).
_MIN_PIECE = 16


class Scrubber:
    """Replaces every secret value it was armed with, in any text, by ``(secret)``.

    Armed from the raw machine config documents an admin read (:meth:`arm`): each secret
    value, each line of a multi-line one (a PEM body), and the base64 form of each, so a
    secret that reached a log, an event or a resource in any of those forms is replaced.
    The last line of defence: what the node hands out is redacted already.
    """

    def __init__(self) -> None:
        self._pieces: set[str] = set()
        self._ordered: list[str] = []

    def arm(self, raw_documents: list[dict[str, Any]]) -> None:
        for value in secret_values(raw_documents):
            self.add(value)

    def add(self, value: str) -> None:
        """Hunt for ``value`` (and its lines and base64 form) from now on."""
        found = {value, base64.b64encode(value.encode()).decode()}
        found.update(
            line.strip()
            for line in value.splitlines()
            if len(line.strip()) >= _MIN_PIECE and not line.startswith("-----")
        )
        new = {p for p in found if p} - self._pieces
        if new:
            self._pieces |= new
            self._ordered = sorted(self._pieces, key=len, reverse=True)

    @property
    def longest(self) -> int:
        return len(self._ordered[0]) if self._ordered else 0

    def __call__(self, text: str) -> str:
        for piece in self._ordered:
            if piece in text:
                text = text.replace(piece, SECRET)
        return text


def redact_sensitive_spec(type_name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A sensitive resource's spec with its secrets replaced: a machine config keeps its
    shape (every secret field ``(secret)``); any other sensitive type keeps its keys,
    numbers and booleans, every text becoming ``(secret)`` (a type this basaltctl does not
    know how to redact field by field is redacted whole)."""
    if type_name == "MachineConfigs" and isinstance(spec.get("yaml"), str):
        return {**spec, "yaml": redact_config_text(spec["yaml"])}
    return {key: _blank(value) for key, value in spec.items()}


def _blank(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _blank(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_blank(item) for item in value]
    if isinstance(value, str) and value:
        return SECRET
    return value


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def node_dir(node: str) -> str:
    """The archive directory of a node (``nodes/10.0.0.2``; ``:`` and the like become ``_``)."""
    return "nodes/" + (_UNSAFE.sub("_", node) or "_")


@dataclass
class Entry:
    """One file of the archive: its name, what it is, its size once written."""

    name: str
    what: str
    size: int = 0
    complete: bool = True


@dataclass
class Failure:
    """Something that could not be collected: where (a node, or ``cluster``), what, why."""

    where: str
    item: str
    error: str


@dataclass
class _TextWriter:
    """Text into one open zip entry, scrubbed a line at a time (a secret split across two
    chunks of a stream is still whole when the scrubber sees it)."""

    handle: IO[bytes]
    scrub: Scrubber
    entry: Entry
    pending: str = ""
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def write(self, data: str | bytes) -> None:
        text = self.decoder.decode(data) if isinstance(data, bytes) else data
        self.pending += text
        cut = self.pending.rfind("\n") + 1
        if cut:
            self._emit(self.scrub(self.pending[:cut]))
            self.pending = self.pending[cut:]
        elif len(self.pending) > _MAX_PENDING:
            # No newline for a long while: scrub it all, keep back a tail in which a
            # secret that continues in the next chunk could begin.
            scrubbed = self.scrub(self.pending)
            keep = max(self.scrub.longest, 1)
            self._emit(scrubbed[:-keep])
            self.pending = scrubbed[-keep:]

    def close(self) -> None:
        self.pending += self.decoder.decode(b"", final=True)
        if self.pending:
            self._emit(self.scrub(self.pending))
            self.pending = ""

    def _emit(self, text: str) -> None:
        raw = text.encode()
        self.handle.write(raw)
        self.entry.size += len(raw)


class SupportArchive:
    """A zip written entry by entry (never held whole in memory), each text scrubbed.

    Every entry and every failure is recorded; :meth:`finish` adds ``README.txt`` (what
    each file is, what failed) and ``manifest.json`` (the same for tools).
    """

    def __init__(self, out: IO[bytes], scrub: Scrubber | None = None) -> None:
        self.zip = zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED)
        self.scrub = scrub or Scrubber()
        self.entries: list[Entry] = []
        self.failures: list[Failure] = []

    @contextmanager
    def open_text(self, name: str, what: str) -> Iterator[_TextWriter]:
        """An entry to stream text (or UTF-8 bytes) into; recorded even when the block
        fails half-way (marked incomplete), so the README says which file is cut short."""
        entry = Entry(name, what)
        self.entries.append(entry)
        info = zipfile.ZipInfo(name, date_time=_now_tuple())
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o600 << 16
        with self.zip.open(info, "w", force_zip64=True) as handle:
            writer = _TextWriter(handle, self.scrub, entry)
            try:
                yield writer
            except BaseException:
                entry.complete = False
                raise
            finally:
                writer.close()

    def text(self, name: str, what: str, text: str) -> None:
        with self.open_text(name, what) as writer:
            writer.write(text)

    def yaml(self, name: str, what: str, data: Any) -> None:
        import yaml

        self.text(name, what, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    def failed(self, where: str, item: str, error: str) -> None:
        self.failures.append(Failure(where, item, self.scrub(error)))

    def abandon(self) -> None:
        """Close the zip without a README (the file is about to be removed)."""
        self.zip.close()

    def node_entries(self) -> int:
        """How many complete files came from nodes (not the README or the summary)."""
        return sum(1 for e in self.entries if e.name.startswith("nodes/") and e.complete)

    def finish(self, header: dict[str, Any]) -> None:
        """Write ``README.txt`` and ``manifest.json``, and close the zip."""
        manifest = {
            **header,
            "files": [
                {"name": e.name, "what": e.what, "size": e.size, "complete": e.complete}
                for e in self.entries
            ],
            "failures": [
                {"where": f.where, "item": f.item, "error": f.error} for f in self.failures
            ],
        }
        self.text("README.txt", "this file", readme(header, self.entries, self.failures))
        self.text("manifest.json", "README.txt for tools (JSON)", json.dumps(manifest, indent=2))
        self.zip.close()


def readme(header: dict[str, Any], entries: list[Entry], failures: list[Failure]) -> str:
    """The archive's README: who collected what, each file, and what could not be had."""
    lines = [
        "Basalt support bundle",
        "=====================",
        "",
        *(f"{key}: {_flat(value)}" for key, value in header.items()),
        "",
        "Secrets: every secret field of the machine config reads (secret); sensitive",
        "resources are included only for os:admin, redacted; every file was scrubbed of",
        "the secret values of the configs read.",
        "",
        "Files",
        "-----",
    ]
    for entry in entries:
        cut = "" if entry.complete else "  [INCOMPLETE: see below]"
        lines.append(f"{entry.name}  ({entry.size} bytes){cut}")
        lines.append(f"    {entry.what}")
    lines += ["", "Not collected", "-------------"]
    if not failures:
        lines.append("(nothing: every item was collected)")
    for failure in failures:
        lines.append(f"{failure.where}: {failure.item}: {failure.error}")
    return "\n".join(lines) + "\n"


def _flat(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "(none)"
    return str(value)


def _now_tuple() -> tuple[int, int, int, int, int, int]:
    import time

    now = time.localtime()
    return (max(now.tm_year, 1980), now.tm_mon, now.tm_mday, now.tm_hour, now.tm_min, now.tm_sec)


@dataclass
class NodeState:
    """What is known of one node while collecting."""

    label: str
    #: Request metadata targets: the node, or none when it is the endpoint itself.
    targets: list[str]
    version: dict[str, Any] | None = None
    unreachable: str = ""
    captured: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    etcd_members: list[dict[str, Any]] | None = None
    etcd_leader: str = ""

    @property
    def directory(self) -> str:
        return node_dir(self.label)

    @property
    def controlplane(self) -> bool:
        return (self.version or {}).get("machine_type") == "controlplane"


def event_line(event: Any) -> str:
    """One event as a line: ID, time (UTC), type, actor, message, then its fields."""
    when = dt.datetime.fromtimestamp(event.timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    message = event.message
    if event.fields:
        message += " " + " ".join(f"{k}={v}" for k, v in sorted(event.fields.items()))
    return f"{event.id:<10} {when} {event.type:<11} {event.actor or '-':<14} {message}\n"


def summary(nodes: list[NodeState]) -> dict[str, Any]:
    """The cluster at a glance, from what was collected of each node."""
    rows = []
    for node in nodes:
        row: dict[str, Any] = {"node": node.label, "directory": node.directory}
        if node.unreachable:
            row["unreachable"] = node.unreachable
        version = node.version or {}
        for key in ("hostname", "machine_type", "tag", "platform", "arch", "mode"):
            if key in version:
                row[key] = version[key]
        boot = node.captured.get("BootStatuses")
        if boot:
            row["boot"] = boot[0]["spec"]
        rows.append(row)
    seen = {n.label: n.etcd_members for n in nodes if n.etcd_members is not None}
    views = [sorted(m["id"] for m in members) for members in seen.values()]
    leaders = {n.label: n.etcd_leader for n in nodes if n.etcd_leader}
    members = next((n.captured["Members"] for n in nodes if n.captured.get("Members")), [])
    asked = {n.label for n in nodes}
    return {
        "nodes": rows,
        "versions": sorted({str(r["tag"]) for r in rows if "tag" in r}),
        "etcd": {
            "membersAsSeenBy": seen,
            "membersAgree": all(v == views[0] for v in views) if views else None,
            "leaderAsSeenBy": leaders,
            "leadersAgree": len(set(leaders.values())) == 1 if leaders else None,
        },
        "clusterMembers": [
            {
                "id": m["metadata"]["id"],
                "hostname": m["spec"].get("hostname", ""),
                "addresses": m["spec"].get("addresses", []),
                "machineType": m["spec"].get("machineType", ""),
                "inThisBundle": bool(
                    asked & {m["metadata"]["id"], *m["spec"].get("addresses", [])}
                ),
            }
            for m in members
        ],
    }
