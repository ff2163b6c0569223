"""The config reference, generated from the document models: Markdown and JSON Schema.

Everything in ``docs/reference/`` comes from the models (descriptions, types, defaults,
constraints, aliases, merge behaviour) plus the small :data:`EXAMPLES` table here, so
the reference cannot drift from what the loader accepts. Output is byte-for-byte
deterministic; ``--check`` fails when the committed files are stale::

    python -m basalt.machinery.config.reference [--check] [--out-dir docs/reference]
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from ..errors import BasaltError
from ..fileio import write_atomic
from ..yamlio import dump_documents
from . import _schema, _types, discovery, update
from ._base import API_VERSION, DOCUMENT_KINDS, Document
from .cluster import ClusterName, KubernetesVersion, PEMPrivateKey
from .fleet import FleetURLText
from .machine import PEMCACertificate
from .redact import secret_locs
from .system import Ed25519PublicKey, EtcPath, FileMode, ModuleParameter

MARKDOWN_FILE = "config.md"
SCHEMA_FILE = "config.schema.json"
DEFAULT_OUT_DIR = Path("docs/reference")
REGENERATE = "make docs"
REPLACED_MARK = "Replaced by merge patches."
SECRET_MARK = "Secret: outputs show it only as changed or unchanged."

#: What the validated string types of the models are called in the tables.
TYPE_LABELS: tuple[tuple[Any, str], ...] = (
    (_types.Subnet, "CIDR"),
    (_types.InterfaceAddress, "IP address/prefix"),
    (_types.IPAddress, "IP address"),
    (_types.Hostname, "host name"),
    (_types.HostOrIP, "host name or IP address"),
    (_types.HttpsURL, "https URL"),
    (_types.URL, "URL"),
    (_types.Token, "token"),
    (_types.Secret32, "base64, 32 bytes"),
    (_types.AbsolutePath, "absolute path"),
    (_types.DiskPath, "device path"),
    (_types.SysctlKey, "sysctl name"),
    (_types.ModuleName, "module name"),
    (_types.EnvName, "variable name"),
    (_types.KernelArg, "kernel argument"),
    (KubernetesVersion, "Kubernetes version"),
    (ClusterName, "cluster name"),
    (PEMPrivateKey, "PEM private key"),
    (PEMCACertificate, "PEM CA certificate"),
    (EtcPath, "path under /etc"),
    (Ed25519PublicKey, "PEM Ed25519 public key"),
    (ModuleParameter, "key=value"),
    (FileMode, "octal mode"),
    (FleetURLText, "fleet URL"),
    (update.HttpURL, "http(s) URL"),
    (update.DurationText, "duration"),
    (update.TUFRoot, "TUF root JSON"),
    (update.CronText, "cron expression"),
    (update.TimeZoneName, "time zone"),
    (discovery.DiscoveryURL, "grpc(s) URL"),
    (discovery.TTLText, "duration"),
)
_BASIC_LABELS: dict[Any, str] = {str: "string", int: "integer", bool: "boolean", float: "number"}

_EXAMPLE_SIGNING_KEY = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MCowBQYDK2VwAyEAPAdHaYR9BLyrpLowGCbVbsi1eKSR8uStRdM8zk3EsWI=\n"
    "-----END PUBLIC KEY-----\n"
)

#: Example documents per kind (apiVersion is added). MachineConfig and ClusterConfig have
#: none: they carry secrets, and ``basaltctl gen config`` writes them.
EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "HostnameConfig": [{"hostname": "cp-1"}],
    "LinkConfig": [
        {
            "name": "eth0",
            "addresses": ["192.0.2.10/24", "2001:db8::10/64"],
            "routes": [{"gateway": "192.0.2.1"}, {"network": "::/0", "gateway": "2001:db8::1"}],
            "mtu": 9000,
        },
        {"name": "eth1", "dhcp": True},
    ],
    "ResolverConfig": [{"nameservers": ["192.0.2.53"], "searchDomains": ["example.com"]}],
    "TimeSyncConfig": [{"servers": ["pool.ntp.org"], "bootTimeoutSeconds": 60}],
    "SysctlConfig": [{"sysctls": {"net.ipv4.ip_forward": "1", "vm.max_map_count": "262144"}}],
    "KernelModuleConfig": [
        {"name": "br_netfilter"},
        {"name": "nf_conntrack", "parameters": ["hashsize=131072"]},
    ],
    "EtcFileConfig": [
        {
            "name": "containerd/certs.d/docker.io/hosts.toml",
            "contents": 'server = "https://registry-1.docker.io"\n\n'
            '[host."https://mirror.example.com"]\n'
            '  capabilities = ["pull", "resolve"]\n',
        }
    ],
    "EnvironmentConfig": [
        {
            "variables": {
                "HTTPS_PROXY": "http://proxy.example.com:3128",
                "NO_PROXY": "10.0.0.0/8,.cluster.local",
            }
        }
    ],
    "LoggingConfig": [{"destinations": [{"endpoint": "tcp://198.51.100.7:5044"}]}],
    "ImageVerificationConfig": [
        {"keys": [{"name": "release-2025", "publicKey": _EXAMPLE_SIGNING_KEY}]}
    ],
    "UpdateConfig": [
        {
            "repository": "https://releases.example.com/basalt/",
            "root": '{"signed": {"_type": "root", "...": "..."}, '
            '"signatures": [{"keyid": "...", "sig": "..."}]}',
            "channel": "stable",
            "mode": "auto",
            "interval": "1h",
            "windows": [{"cron": "0 2 * * sat,sun", "duration": "4h", "timezone": "Europe/Berlin"}],
            "rebootCoordinator": {"url": "https://fleet.example.com:8443/", "group": "edge"},
        }
    ],
    "DiscoveryConfig": [{"url": "grpcs://discovery.example.com:3000", "ttl": "30m"}],
}


class SchemaConflictError(BasaltError):
    """Two different models share a class name, so their JSON Schema ``$defs`` collide.

    Raised by :func:`schema`; rename one of the model classes.
    """


@dataclass(frozen=True)
class FieldRow:
    """One line of a kind's field table."""

    path: str
    type: str
    default: str
    description: str


# -- types, defaults and constraints ---------------------------------------------------------


def _yaml_scalar(value: Any) -> str:
    """``value`` as it would be written in YAML: bare when YAML reads it back unchanged."""
    if isinstance(value, str) and value and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def _one_of(values: Sequence[str], last: str = "or") -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    if len(values) <= 1:
        return "".join(values)
    return f"{', '.join(values[:-1])} {last} {values[-1]}"


def _validator_label(annotation: Any) -> str | None:
    """The label of a validated string type (``Subnet`` ...), matched by its validators."""
    if typing.get_origin(annotation) is not typing.Annotated:
        return None
    for known, label in TYPE_LABELS:
        if known == annotation:
            return label
    return None


def _label_from_metadata(base: Any, metadata: Sequence[Any]) -> str | None:
    """pydantic moves a field's top-level ``Annotated`` validators into ``metadata``."""
    kinds = (AfterValidator, BeforeValidator)
    validators = tuple(m for m in metadata if isinstance(m, kinds))
    for known, label in TYPE_LABELS:
        wanted = tuple(m for m in known.__metadata__ if isinstance(m, kinds))
        if typing.get_args(known)[0] is base and wanted and wanted == validators:
            return label
    return None


def type_label(annotation: Any) -> str:
    """A short, readable name for a field's type: ``list of CIDR``, ``integer`` ..."""
    label = _validator_label(annotation)
    if label is not None:
        return label
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_label(args[0])
    if origin in (typing.Union, types.UnionType):
        return _one_of([type_label(a) for a in args if a is not type(None)])
    if origin is typing.Literal:
        return _one_of([f"`{_yaml_scalar(a)}`" for a in args])
    if origin is list:
        return f"list of {type_label(args[0])}"
    if origin is dict:
        return f"map of {type_label(args[0])} to {type_label(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    return _BASIC_LABELS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _field_type(info: FieldInfo) -> str:
    return _label_from_metadata(info.annotation, info.metadata) or type_label(info.annotation)


def default_label(info: FieldInfo) -> str:
    """``required``, ``unset`` (optional, no value), or the default as YAML."""
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True, validated_data={})
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "see fields"
    return f"`{_yaml_scalar(value)}`"


def _strip_optional(annotation: Any) -> Any:
    """``X | None`` and ``Annotated[X, ...]`` -> ``X``; other unions stay as they are."""
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
            annotation = next(a for a in args if a is not type(None))
        else:
            return annotation


def _is_sized(annotation: Any) -> bool:
    return typing.get_origin(_strip_optional(annotation)) in (list, dict)


def constraint_notes(info: FieldInfo) -> list[str]:
    """Range, length and pattern constraints of a field, as sentences."""
    found: dict[str, Any] = {}
    for meta in info.metadata:
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern"):
            value = getattr(meta, name, None)
            if value is not None:
                found[name] = value
    notes = []
    if "ge" in found and "le" in found:
        notes.append(f"From {found.pop('ge')} to {found.pop('le')}.")
    for name, words in (
        ("ge", "At least"),
        ("gt", "More than"),
        ("le", "At most"),
        ("lt", "Less than"),
    ):
        if name in found:
            notes.append(f"{words} {found[name]}.")
    unit = "item" if _is_sized(info.annotation) else "character"
    shortest, longest = found.get("min_length"), found.get("max_length")
    if shortest is not None:
        notes.append(f"At least {shortest} {unit}{'s' if shortest != 1 else ''}.")
    if longest is not None:
        notes.append(f"At most {longest} {unit}{'s' if longest != 1 else ''}.")
    if "pattern" in found:
        notes.append(f"Matches `{found['pattern']}`.")
    return notes


# -- field tables ------------------------------------------------------------------------------


def _container(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """For ``list[Model]`` / ``dict[str, Model]`` fields: the path suffix and the item model."""
    annotation = _strip_optional(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    item = args[0] if origin is list else args[1] if origin is dict else None
    if isinstance(item, type) and issubclass(item, BaseModel):
        return ("[]." if origin is list else ".<key>."), item
    return None


def field_rows(
    model: type[BaseModel], prefix: str = "", _stack: tuple[type[BaseModel], ...] = ()
) -> list[FieldRow]:
    """Every field of ``model`` by YAML path, nested models flattened (``routes[].gateway``)."""
    rows: list[FieldRow] = []
    for key in _schema.field_keys(model):
        info = _schema.field_info(model, key)
        assert info is not None
        path = f"{prefix}{key}"
        notes = constraint_notes(info)
        if _schema.replaces_on_merge(model, key):
            notes.append(f"*{REPLACED_MARK}*")
        if (key,) in secret_locs(model):
            notes.append(f"*{SECRET_MARK}*")
        description = " ".join([info.description or "", *notes]).strip()
        rows.append(FieldRow(path, _field_type(info), default_label(info), description))
        nested = _schema.submodel(model, key)
        container = _container(info.annotation)
        stack = (*_stack, model)  # a model that contains itself is listed once
        if nested is not None and nested not in stack:
            rows.extend(field_rows(nested, f"{path}.", stack))
        elif container is not None and container[1] not in stack:
            rows.extend(field_rows(container[1], f"{path}{container[0]}", stack))
    return rows


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(rows: Sequence[FieldRow]) -> list[str]:
    lines = ["| Field | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for row in rows:
        cells = [f"`{row.path}`", row.type, row.default, row.description]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


# -- Markdown ----------------------------------------------------------------------------------


def example_documents(kind: str) -> list[dict[str, Any]]:
    """The :data:`EXAMPLES` of ``kind`` as complete documents (empty when it has none)."""
    return [{"apiVersion": API_VERSION, "kind": kind, **doc} for doc in EXAMPLES.get(kind, [])]


def _docstring(cls: type[Document]) -> str:
    return " ".join(inspect.cleandoc(cls.__doc__ or "").split())


def _intro() -> list[str]:
    named = [f"`{kind}`" for kind, cls in DOCUMENT_KINDS.items() if cls.named]
    contents = [f"- [{kind}](#{kind.lower()})" for kind in DOCUMENT_KINDS]
    return [
        "# Machine config reference",
        "",
        "<!-- Generated by `python -m basalt.machinery.config.reference` from the config"
        f" models. Do not edit; run `{REGENERATE}`. -->",
        "",
        "A Basalt machine config is one multi-document YAML file. Every document has",
        f"`apiVersion: {API_VERSION}`, a `kind`, and the fields of that kind, spelled in",
        "camelCase. An unknown kind, apiVersion or field is an error, reported with its",
        "document, field path and line. `basaltctl gen config` writes a complete config with",
        "one `MachineConfig` and one `ClusterConfig`; `basaltctl validate -c FILE -m MODE`",
        "checks a config, including rules that span documents and are not in these tables",
        "(for example, control planes must hold every CA key and workers none).",
        "",
        "## Documents and merge patches",
        "",
        "- **Singleton kinds** appear at most once per config. A merge patch document of",
        "  that kind merges into it, or is added when the config has none.",
        f"- **Named kinds** ({_one_of(named, 'and')}) carry a `name` and appear",
        "  once per name. A merge patch document must give the `name`; it merges into the",
        "  document with the same kind and name, or is added as a new document.",
        "- Inside a document, maps merge key by key and scalars are replaced. Lists append the",
        "  patch's items that are not already present, except the fields marked",
        f"  *{REPLACED_MARK}* below: a patch replaces those lists whole.",
        "- `$patch: delete` as a field's value removes the field; as a key of a patch",
        "  document it removes the matching document. `$patch: replace` inside a map",
        "  replaces that map whole.",
        "",
        "## Reading the tables",
        "",
        "- **Field** is the YAML path inside the document: `network.podSubnets` is key",
        "  `podSubnets` of mapping `network`; `routes[].gateway` is `gateway` of each item",
        "  of list `routes`.",
        "- **Default** is `required`, `unset` (optional, no value), `see fields` (an",
        "  optional mapping whose fields have their own defaults), or the value used when",
        "  the field is left out.",
        "- Basalt reads YAML 1.1: quote strings that YAML would read as another type, such",
        '  as `"off"`, `"yes"` or `"1"`.',
        f"- [`{SCHEMA_FILE}`]({SCHEMA_FILE}) is a JSON Schema for a single document, for",
        "  editors and other tools. It checks structure only; value formats (CIDRs, PEM",
        "  blocks ...) and rules across documents are checked by `basaltctl validate`.",
        "",
        "## Kinds",
        "",
        *contents,
    ]


def _kind_section(kind: str, cls: type[Document]) -> list[str]:
    if cls.named:
        identity = (
            "*Named kind:* one document per `name`; merge patches match on `kind` and `name`."
        )
    else:
        identity = "*Singleton kind:* at most one per config; merge patches match on `kind`."
    lines = ["", f"## {kind}", "", _docstring(cls), "", identity, "", *_table(field_rows(cls))]
    examples = example_documents(kind)
    if examples:
        lines += ["", "Example:", "", "```yaml", *dump_documents(examples).splitlines(), "```"]
    return lines


def render_markdown() -> str:
    """``config.md``: the intro, then one section per kind in registry order."""
    lines = _intro()
    for kind, cls in DOCUMENT_KINDS.items():
        lines += _kind_section(kind, cls)
    return "\n".join(lines) + "\n"


# -- JSON Schema -------------------------------------------------------------------------------


def schema() -> dict[str, Any]:
    """A draft 2020-12 schema: ``oneOf`` every kind's ``model_json_schema(by_alias=True)``.

    Each kind and every model it uses become ``$defs``; raises
    :class:`SchemaConflictError` when two different models share a name.
    """
    defs: dict[str, Any] = {}

    def define(name: str, definition: Any, owner: str) -> None:
        if name in defs and defs[name] != definition:
            raise SchemaConflictError(
                f"{owner}: two different models are named {name!r}",
                hint="rename one of the model classes; JSON Schema $defs are keyed by name",
            )
        defs[name] = definition

    for kind, cls in DOCUMENT_KINDS.items():
        kind_schema = cls.model_json_schema(by_alias=True)
        for name, definition in kind_schema.pop("$defs", {}).items():
            define(name, definition, kind)
        define(kind, kind_schema, kind)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Basalt machine config document ({API_VERSION})",
        "description": (
            "One document of a Basalt machine config (a multi-document YAML file). Checks "
            "structure only; basaltctl validate also checks value formats and cross-document "
            f"rules. Generated from the config models; do not edit, run `{REGENERATE}`."
        ),
        "oneOf": [{"$ref": f"#/$defs/{kind}"} for kind in DOCUMENT_KINDS],
        "$defs": defs,
    }


def render_schema() -> str:
    """``config.schema.json``: :func:`schema` with sorted keys, two-space indent, newline."""
    return json.dumps(schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# -- files -------------------------------------------------------------------------------------


def render_all() -> dict[str, str]:
    """Every generated file, by name inside the output directory."""
    return {MARKDOWN_FILE: render_markdown(), SCHEMA_FILE: render_schema()}


def stale_files(out_dir: Path) -> list[Path]:
    """The generated files under ``out_dir`` that are missing or differ from the models."""
    stale = []
    for name, text in render_all().items():
        path = out_dir / name
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            stale.append(path)
    return stale


def write_files(out_dir: Path) -> list[Path]:
    """Write the stale generated files under ``out_dir``; returns the paths written."""
    written = stale_files(out_dir)
    texts = render_all()
    for path in written:
        write_atomic(path, texts[path.name])
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: write the reference, or with ``--check`` report stale files."""
    parser = argparse.ArgumentParser(
        prog="python -m basalt.machinery.config.reference",
        description="Generate the config reference (Markdown and JSON Schema) from the models.",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="output directory")
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir
    if args.check:
        stale = stale_files(out_dir)
        for path in stale:
            state = "is out of date with" if path.exists() else "is missing; it is generated from"
            print(f"{path} {state} the config models", file=sys.stderr)
        if stale:
            hint = f"  hint: regenerate with '{REGENERATE}', then commit the result"
            print(hint, file=sys.stderr)
            return 1
        return 0
    for path in write_files(out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
