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
    "CustomExtensionRef",
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
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: Environment variable names a service may set (and those machined owns).
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENVIRONMENT = ("LD_LIBRARY_PATH", "LD_PRELOAD", "LD_AUDIT")
#: Ids of the services machined runs itself: a second service with one of them would stop
#: the node's services from being registered at all.
RESERVED_SERVICE_NAMES = ("apid", "trustd", "etcd", "containerd", "kubelet")
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
class CustomExtensionRef:
    """A custom extension a schematic names: the sha256 of its signed squashfs (what
    ``basaltctl extension build`` printed) and, for the CLI, where the file is (relative
    paths are relative to the schematic's directory). Without a path, a factory finds it
    in its registry by the sha256. Only the sha256 is part of the schematic's id."""

    sha256: str
    path: str = ""


@dataclass(frozen=True)
class Schematic:
    """What an image is customised with. ``extensions`` (official names) is sorted and
    without duplicates; ``custom_extensions`` is sorted by sha256, without duplicates."""

    extra_kernel_args: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    custom_extensions: tuple[CustomExtensionRef, ...] = ()

    def canonical(self) -> dict[str, Any]:
        """The parsed model as plain data (every field present, defaults included).

        ``customExtensions`` (the sha256s) appears only when there are any, so that
        schematics written before custom extensions existed keep their ids."""
        extensions: dict[str, Any] = {"officialExtensions": list(self.extensions)}
        if self.custom_extensions:
            extensions["customExtensions"] = [ref.sha256 for ref in self.custom_extensions]
        return {
            "customization": {
                "extraKernelArgs": list(self.extra_kernel_args),
                "systemExtensions": extensions,
            }
        }

    def canonical_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))

    @property
    def id(self) -> str:
        """sha256 (hex) of :meth:`canonical_json`."""
        import hashlib  # when first needed: it loads libcrypto

        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        """What ``image.json`` (and the node) records: id, extensions, kernel args (and the
        custom extensions' sha256s when there are any)."""
        record: dict[str, Any] = {
            "id": self.id,
            "extensions": list(self.extensions),
            "extraKernelArgs": list(self.extra_kernel_args),
        }
        if self.custom_extensions:
            record["customExtensions"] = [ref.sha256 for ref in self.custom_extensions]
        return record

    def to_yaml(self) -> str:
        """The schematic as YAML that parses back to an equal schematic."""
        from .yamlio import dump_document

        data = self.canonical()
        if self.custom_extensions:
            data["customization"]["systemExtensions"]["customExtensions"] = [
                {"sha256": ref.sha256, **({"path": ref.path} if ref.path else {})}
                for ref in self.custom_extensions
            ]
        return dump_document(data)


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
    extensions = reader.mapping(
        custom.get("systemExtensions"), ext_loc, ("officialExtensions", "customExtensions")
    )
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
    refs = _custom_refs(reader, extensions.get("customExtensions"), (*ext_loc, "customExtensions"))
    if reader.problems:
        raise SchematicError(reader.problems, source=source)
    return Schematic(
        extra_kernel_args=tuple(args),
        extensions=tuple(sorted(names)),
        custom_extensions=tuple(sorted(refs, key=lambda ref: ref.sha256)),
    )


def _custom_refs(reader: _Reader, value: Any, loc: Loc) -> list[CustomExtensionRef]:
    if value is None:
        return []
    if not isinstance(value, list):
        reader.problem(loc, f"must be a list of {{sha256, path}} mappings, not {_kind(value)}")
        return []
    refs: list[CustomExtensionRef] = []
    seen: set[str] = set()
    for index, raw in enumerate(value):
        where: Loc = (*loc, index)
        if not isinstance(raw, dict):
            reader.problem(
                where,
                f"must be a mapping, not {_kind(raw)}",
                hint="e.g. {path: ./hello.sqfs, sha256: <printed by 'basaltctl extension build'>}",
            )
            continue
        data = reader.mapping(raw, where, ("sha256", "path"))
        digest = data.get("sha256")
        if "sha256" not in data:
            reader.problem(
                (*where, "sha256"),
                "is required",
                hint="the sha256 that 'basaltctl extension build' printed for the file",
            )
            continue
        if not isinstance(digest, str) or not _SHA256.match(digest):
            reader.problem(
                (*where, "sha256"),
                f"{digest!r} is not a sha256 (64 lower-case hex digits)",
                hint="the sha256 that 'basaltctl extension build' printed for the file",
            )
            continue
        path = data.get("path", "")
        if not isinstance(path, str) or ("path" in data and not path):
            reader.problem((*where, "path"), f"must be a non-empty string, not {_kind(path)}")
            continue
        if digest in seen:
            reader.problem((*where, "sha256"), "extension listed twice", hint="list it once")
            continue
        seen.add(digest)
        refs.append(CustomExtensionRef(digest, path))
    return refs


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
    #: Extra environment variables, sorted by name (machined sets PATH, LANG and
    #: LD_LIBRARY_PATH itself; the loader's variables are refused).
    environment: tuple[tuple[str, str], ...] = ()

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
        if self.environment:
            data["environment"] = dict(self.environment)
        return data


@dataclass(frozen=True)
class ExtensionManifest:
    """``manifest.yaml`` of one extension."""

    name: str
    version: str
    description: str = ""
    services: tuple[ExtensionService, ...] = field(default=())
    #: Files the extension provides at fixed root paths (sorted), each below one of
    #: :data:`~basalt.machinery.image_layout.OVERLAY_DIRECTORIES`: machined shows them
    #: there through a read-only overlay of that directory.
    provides: tuple[str, ...] = ()

    def to_yaml(self) -> str:
        from .yamlio import dump_document

        data: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "services": [service.to_data() for service in self.services],
        }
        if self.provides:
            data["provides"] = list(self.provides)
        return dump_document(data)

    def overlay_directories(self) -> tuple[str, ...]:
        """The root directories (no leading '/') this extension's files are shown in."""
        return tuple(sorted({overlay_directory(path) or "" for path in self.provides} - {""}))


def overlay_directory(path: str) -> str | None:
    """The overlay directory (``usr/local/bin``) that a fixed path is below, or None."""
    from .image_layout import OVERLAY_DIRECTORIES

    relative = path.lstrip("/")
    for directory in OVERLAY_DIRECTORIES:
        if relative.startswith(directory + "/") and len(relative) > len(directory) + 1:
            return directory
    return None


_MANIFEST_FIELDS = ("name", "version", "description", "services", "provides")
_SERVICE_FIELDS = (
    "name",
    "command",
    "args",
    "restart",
    "needs",
    "stateDirectory",
    "environment",
)


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
    provides: set[str] = set()
    for where, path in reader.strings(top.get("provides"), ("provides",)):
        reason = _fixed_path_problem(path)
        if reason:
            reader.problem(where, reason[0], hint=reason[1])
        elif path in provides:
            reader.problem(where, f"{path} is listed twice", hint="list it once")
        provides.add(path)
    if reader.problems:
        raise ManifestError(reader.problems, source=source, kind="extension manifest")
    return ExtensionManifest(
        name, version, str(description), tuple(services), tuple(sorted(provides))
    )


def _fixed_path_problem(path: str) -> tuple[str, str] | None:
    from .image_layout import OVERLAY_DIRECTORIES

    where = ", ".join("/" + d for d in OVERLAY_DIRECTORIES)
    parts = path.split("/")
    if not path.startswith("/") or any(p in ("", ".", "..") for p in parts[1:]):
        return (
            f"{path!r} must be an absolute, normal path (no '..', '.' or '//')",
            f"e.g. /usr/local/bin/kubelet; fixed paths live below {where}",
        )
    if not path.isprintable():
        return (f"{path!r} contains control characters", "use a plain file name")
    if overlay_directory(path) is None:
        return (
            f"{path} is not below a directory extensions may provide files in",
            f"fixed paths live below {where}; other files stay inside the extension",
        )
    return None


def _service(reader: _Reader, raw: Any, loc: Loc) -> ExtensionService | None:
    before = len(reader.problems)
    data = reader.mapping(raw, loc, _SERVICE_FIELDS)
    if not data:
        if not reader.problems[before:]:
            reader.problem(loc, "a service needs at least a name and a command")
        return None
    name = reader.string(
        data.get("name"),
        (*loc, "name"),
        lambda v: (
            f"{v!r} is a service machined runs itself (an extension may not replace it)"
            if v in RESERVED_SERVICE_NAMES
            else _check_name(v)
        ),
    )
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
    environment: dict[str, str] = {}
    raw_env = data.get("environment")
    if raw_env is not None and not isinstance(raw_env, dict):
        reader.problem((*loc, "environment"), f"must be a mapping, not {_kind(raw_env)}")
    for key, value in (raw_env or {}).items() if isinstance(raw_env, dict) else ():
        where: Loc = (*loc, "environment", str(key))
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            reader.problem(where, f"{key!r} is not an environment variable name")
        elif key in RESERVED_ENVIRONMENT or key in ("PATH", "LANG"):
            reader.problem(
                where,
                f"{key} is set by machined",
                hint="machined sets PATH, LANG and LD_LIBRARY_PATH; the loader's "
                "variables may not be set",
            )
        elif not isinstance(value, str | int | float) or isinstance(value, bool):
            reader.problem(where, f"must be a string, not {_kind(value)}")
        elif "\0" in str(value):
            reader.problem(where, "contains a NUL character")
        else:
            environment[key] = str(value)
    if len(reader.problems) > before:
        return None
    return ExtensionService(
        name, command, args, restart, port, state, tuple(sorted(environment.items()))
    )
