"""Schematics (what an image is customised with) and system extension manifests.

A schematic is a small YAML file::

    customization:
      extraKernelArgs: [console=ttyS1]
      systemExtensions:
        officialExtensions: [qemu-guest-agent]

Parsing is strict: an unknown key, a value of the wrong type or an extension name the
imager cannot build is an error naming the file, line and field, with a hint. The
schematic's id is the sha256 of its canonical form (sorted-key, compact JSON of the
parsed model), so formatting, comments and key order do not change it. Extension names
are a set (sorted, no duplicates); kernel arguments keep their order, which matters.

An extension manifest (``manifest.yaml`` at the top of an extension's squashfs) names the
extension, its version and the services it adds; the imager writes it and machined reads
it at boot. Both sides use :func:`parse_manifest`, so what one writes the other accepts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import BasaltError, ConfigSyntaxError, Problem, format_path

if TYPE_CHECKING:
    # YAML only when a schematic is parsed: machined reads the image's schematic record
    # (JSON) on every boot, before its API opens.
    from .yamlio import Loc, RawDocument

__all__ = [
    "EMPTY",
    "OFFICIAL_EXTENSIONS",
    "ExtensionManifest",
    "ExtensionService",
    "ManifestError",
    "RestartPolicyName",
    "Schematic",
    "SchematicError",
    "parse_manifest",
    "parse_schematic",
    "read_schematic",
]

#: The system extensions the imager knows how to build (``basalt.imager.extensions``).
OFFICIAL_EXTENSIONS: tuple[str, ...] = ("qemu-guest-agent",)

#: Kernel arguments a schematic may not set: the image and the boot path own them.
RESERVED_KERNEL_ARGS = (
    "basalt.root",
    "basalt.slot",
    "basalt.schematic",
    "basalt.entry",  # set by a kexec reboot: which boot entry it started
    "init",
    "rdinit",
)

RestartPolicyName = Literal["always", "onFailure", "never"]
RESTART_POLICIES: tuple[str, ...] = ("always", "onFailure", "never")

_NAME = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,62}$")
#: Where an extension may keep run-time state: below /run only (the root is read-only).
_STATE_DIR = re.compile(r"^/run/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
#: ``{virtioPort}`` in a service's arguments becomes the port's device path.
VIRTIO_PORT_PLACEHOLDER = "{virtioPort}"


class SchematicError(BasaltError):
    """A schematic file could not be used; ``problems`` lists every fault with its line."""

    def __init__(self, problems: list[Problem], *, source: str, kind: str = "schematic") -> None:
        self.problems = sorted(problems, key=lambda p: p.line or 0)  # in file order
        self.source = source
        count = len(problems)
        lines = [f"{source}: {count} {'error' if count == 1 else 'errors'} in the {kind}"]
        lines += [p.render() for p in problems]
        super().__init__("\n".join(lines), hint="fix every listed field; nothing was built")


class ManifestError(SchematicError):
    """An extension's ``manifest.yaml`` is malformed (a build bug or a damaged image)."""


@dataclass(frozen=True)
class Schematic:
    """What an image is customised with. ``extensions`` is sorted and without duplicates."""

    extra_kernel_args: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()

    def canonical(self) -> dict[str, Any]:
        """The parsed model as plain data (every field present, defaults included)."""
        return {
            "customization": {
                "extraKernelArgs": list(self.extra_kernel_args),
                "systemExtensions": {"officialExtensions": list(self.extensions)},
            }
        }

    def canonical_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))

    @property
    def id(self) -> str:
        """sha256 (hex) of :meth:`canonical_json`."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        """What ``image.json`` (and the node) records: id, extensions, kernel args."""
        return {
            "id": self.id,
            "extensions": list(self.extensions),
            "extraKernelArgs": list(self.extra_kernel_args),
        }


#: The schematic of an image built without one.
EMPTY = Schematic()


class _Reader:
    """Walks one YAML document, collecting problems with their lines."""

    def __init__(self, document: RawDocument | None, source: str, kind: str) -> None:
        self.document = document
        self.source = source
        self.kind = kind
        self.problems: list[Problem] = []

    def problem(self, loc: Loc, message: str, hint: str | None = None) -> None:
        line = self.document.line_of(loc) if self.document else None
        self.problems.append(
            Problem(self.kind, format_path(loc), message, hint=hint, source=self.source, line=line)
        )

    def mapping(self, value: Any, loc: Loc, known: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(loc, f"must be a mapping, not {_kind(value)}")
            return {}
        for key in value:
            if key not in known:
                self.problem(
                    (*loc, str(key)),
                    f"unknown field {key!r}",
                    hint=f"the fields here are: {', '.join(known)}",
                )
        return {k: v for k, v in value.items() if k in known}

    def strings(self, value: Any, loc: Loc) -> Iterator[tuple[Loc, str]]:
        if value is None:
            return
        if not isinstance(value, list):
            self.problem(loc, f"must be a list of strings, not {_kind(value)}")
            return
        for index, item in enumerate(value):
            if isinstance(item, str):
                yield (*loc, index), item
            else:
                self.problem((*loc, index), f"must be a string, not {_kind(item)}")

    def string(self, value: Any, loc: Loc, check: Callable[[str], str | None]) -> str:
        if not isinstance(value, str) or not value:
            self.problem(loc, f"must be a non-empty string, not {_kind(value)}")
            return ""
        reason = check(value)
        if reason:
            self.problem(loc, reason)
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _one_document(text: str, source: str, kind: str) -> RawDocument | None:
    from .yamlio import parse_documents

    documents = parse_documents(text, source)
    if len(documents) > 1:
        raise ConfigSyntaxError(
            f"a {kind} is one YAML document, this file has {len(documents)}",
            source=source,
            line=documents[1].line,
            hint="remove the '---' and the documents after the first",
        )
    return documents[0] if documents else None


def parse_schematic(text: str, source: str = "<schematic>") -> Schematic:
    """The :class:`Schematic` in ``text``; an empty text is the empty schematic.

    Raises :class:`SchematicError` listing every problem (file, line, field, hint), or
    :class:`~basalt.machinery.errors.ConfigSyntaxError` for YAML that does not parse.
    """
    document = _one_document(text, source, "schematic")
    reader = _Reader(document, source, "schematic")
    top = reader.mapping(document.data if document else None, (), ("customization",))
    loc: Loc = ("customization",)
    custom = reader.mapping(top.get("customization"), loc, ("extraKernelArgs", "systemExtensions"))
    args: list[str] = []
    for where, arg in reader.strings(custom.get("extraKernelArgs"), (*loc, "extraKernelArgs")):
        reason = _kernel_arg_problem(arg)
        if reason:
            reader.problem(where, reason[0], hint=reason[1])
        else:
            args.append(arg)
    ext_loc: Loc = (*loc, "systemExtensions")
    extensions = reader.mapping(custom.get("systemExtensions"), ext_loc, ("officialExtensions",))
    names: set[str] = set()
    official = extensions.get("officialExtensions")
    for where, name in reader.strings(official, (*ext_loc, "officialExtensions")):
        if name not in OFFICIAL_EXTENSIONS:
            reader.problem(
                where,
                f"unknown extension {name!r}",
                hint=f"official extensions: {', '.join(OFFICIAL_EXTENSIONS)}",
            )
        elif name in names:
            reader.problem(where, f"extension {name!r} is listed twice", hint="list it once")
        names.add(name)
    if reader.problems:
        raise SchematicError(reader.problems, source=source)
    return Schematic(extra_kernel_args=tuple(args), extensions=tuple(sorted(names)))


def read_schematic(path: Path) -> Schematic:
    """:func:`parse_schematic` of the file ``path``."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BasaltError(
            f"cannot read schematic {path}: {getattr(exc, 'strerror', None) or exc}",
            hint="pass the path of a schematic YAML file (see examples/schematic-qemu.yaml)",
        ) from None
    return parse_schematic(text, str(path))


def _kernel_arg_problem(arg: str) -> tuple[str, str] | None:
    if not arg or any(c.isspace() for c in arg) or not arg.isprintable():
        return (
            f"kernel argument {arg!r} is empty or contains spaces or control characters",
            "give each argument as its own list item, e.g. [console=ttyS1, quiet]",
        )
    key = arg.partition("=")[0]
    if key in RESERVED_KERNEL_ARGS:
        return (
            f"kernel argument {key!r} is set by the image or the boot path",
            f"a schematic may not set {', '.join(RESERVED_KERNEL_ARGS)}",
        )
    return None


# -- extension manifests ------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtensionService:
    """A service an extension adds.

    ``command`` is a path inside the extension (``/usr/sbin/qemu-ga``); ``args`` may use
    ``{virtioPort}``, which becomes the ``/dev/vportNpM`` of the virtio-serial port named
    ``virtio_port`` (the service is skipped when the machine has no such port).
    ``state_directory`` (below ``/run``) is created before each start.
    """

    name: str
    command: str
    args: tuple[str, ...] = ()
    restart: RestartPolicyName = "always"
    virtio_port: str = ""
    state_directory: str = ""

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "command": self.command,
            "args": list(self.args),
            "restart": self.restart,
        }
        if self.virtio_port:
            data["needs"] = {"virtioPort": self.virtio_port}
        if self.state_directory:
            data["stateDirectory"] = self.state_directory
        return data


@dataclass(frozen=True)
class ExtensionManifest:
    """``manifest.yaml`` of one extension."""

    name: str
    version: str
    description: str = ""
    services: tuple[ExtensionService, ...] = field(default=())

    def to_yaml(self) -> str:
        from .yamlio import dump_document

        data = {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "services": [service.to_data() for service in self.services],
        }
        return dump_document(data)


_MANIFEST_FIELDS = ("name", "version", "description", "services")
_SERVICE_FIELDS = ("name", "command", "args", "restart", "needs", "stateDirectory")


def _check_name(value: str) -> str | None:
    if _NAME.match(value):
        return None
    return f"{value!r} is not a name (lower case letters, digits, '.', '+', '-')"


def parse_manifest(text: str, source: str = "manifest.yaml") -> ExtensionManifest:
    """The :class:`ExtensionManifest` in ``text``; raises :class:`ManifestError`."""
    document = _one_document(text, source, "extension manifest")
    reader = _Reader(document, source, "manifest")
    top = reader.mapping(document.data if document else None, (), _MANIFEST_FIELDS)
    for required in ("name", "version"):
        if required not in top:
            reader.problem((required,), "is required")
    name = reader.string(top.get("name"), ("name",), _check_name) if "name" in top else ""
    version = str(top.get("version") or "")
    if "version" in top and not (isinstance(top["version"], str) and version.isprintable()):
        reader.problem(("version",), "must be a string (quote it)")
    description = top.get("description") or ""
    if not isinstance(description, str):
        reader.problem(("description",), f"must be a string, not {_kind(description)}")
    services: list[ExtensionService] = []
    raw_services = top.get("services") or []
    if not isinstance(raw_services, list):
        reader.problem(("services",), f"must be a list, not {_kind(raw_services)}")
        raw_services = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_services):
        service = _service(reader, raw, ("services", index))
        if service is None:
            continue
        if service.name in seen:
            reader.problem(("services", index, "name"), f"service {service.name!r} twice")
        seen.add(service.name)
        services.append(service)
    if reader.problems:
        raise ManifestError(reader.problems, source=source, kind="extension manifest")
    return ExtensionManifest(name, version, str(description), tuple(services))


def _service(reader: _Reader, raw: Any, loc: Loc) -> ExtensionService | None:
    before = len(reader.problems)
    data = reader.mapping(raw, loc, _SERVICE_FIELDS)
    if not data:
        if not reader.problems[before:]:
            reader.problem(loc, "a service needs at least a name and a command")
        return None
    name = reader.string(data.get("name"), (*loc, "name"), _check_name)
    command = reader.string(
        data.get("command"),
        (*loc, "command"),
        lambda v: (
            None
            if v.startswith("/") and ".." not in v.split("/")
            else f"{v!r} must be an absolute path inside the extension, without '..'"
        ),
    )
    args = tuple(arg for _, arg in reader.strings(data.get("args"), (*loc, "args")))
    restart = data.get("restart", "always")
    if restart not in RESTART_POLICIES:
        reader.problem(
            (*loc, "restart"),
            f"unknown restart policy {restart!r}",
            hint=f"one of: {', '.join(RESTART_POLICIES)}",
        )
    needs = reader.mapping(data.get("needs"), (*loc, "needs"), ("virtioPort",))
    port = ""
    if "virtioPort" in needs:
        port = reader.string(needs["virtioPort"], (*loc, "needs", "virtioPort"), lambda v: None)
    if any(VIRTIO_PORT_PLACEHOLDER in arg for arg in args) and not port:
        reader.problem(
            (*loc, "args"),
            f"uses {VIRTIO_PORT_PLACEHOLDER} but the service needs no virtio port",
            hint="add needs: {virtioPort: PORT-NAME}",
        )
    state = ""
    if "stateDirectory" in data:
        state = reader.string(
            data["stateDirectory"],
            (*loc, "stateDirectory"),
            lambda v: (
                None
                if _STATE_DIR.match(v) and ".." not in v.split("/")
                else f"{v!r} must be a directory below /run (the root is read-only)"
            ),
        )
    if len(reader.problems) > before:
        return None
    return ExtensionService(name, command, args, restart, port, state)
