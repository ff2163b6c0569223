"""The generated config reference: current on disk, complete, and honest about the models."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import AfterValidator, BaseModel

from basalt.machinery.config import DOCUMENT_KINDS, Mode, check_bundle, load_bundle
from basalt.machinery.config import reference as ref
from basalt.machinery.yamlio import dump_documents

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reference"
API = "basalt.dev/v1alpha1"


@pytest.fixture(scope="module")
def markdown() -> str:
    return ref.render_markdown()


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(ref.render_schema())


# -- the committed files ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [ref.MARKDOWN_FILE, ref.SCHEMA_FILE])
def test_committed_reference_is_current(name: str) -> None:
    path = DOCS / name
    assert path.exists(), f"{path} is missing; run 'make docs'"
    assert path.read_text(encoding="utf-8") == ref.render_all()[name], (
        f"{path} is stale: a config model changed; run 'make docs' and commit the result"
    )


def test_output_is_deterministic() -> None:
    assert ref.render_all() == ref.render_all()
    assert ref.render_schema().endswith("}\n")
    assert ref.render_markdown().endswith("\n") and not ref.render_markdown().endswith("\n\n")


def test_check_reports_stale_files_and_write_fixes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ref.main(["--check", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / ref.MARKDOWN_FILE) in err and str(tmp_path / ref.SCHEMA_FILE) in err
    assert "make docs" in err

    assert ref.main(["--out-dir", str(tmp_path)]) == 0
    assert ref.main(["--check", "--out-dir", str(tmp_path)]) == 0
    for name, text in ref.render_all().items():
        assert (tmp_path / name).read_text(encoding="utf-8") == text

    (tmp_path / ref.SCHEMA_FILE).write_text("{}\n", encoding="utf-8")
    assert ref.stale_files(tmp_path) == [tmp_path / ref.SCHEMA_FILE]
    assert ref.write_files(tmp_path) == [tmp_path / ref.SCHEMA_FILE]
    assert ref.stale_files(tmp_path) == []


# -- the Markdown ------------------------------------------------------------------------------


def test_every_kind_has_a_section_in_registry_order(markdown: str) -> None:
    headings = re.findall(r"^## (\w+)$", markdown, flags=re.MULTILINE)
    kinds = [h for h in headings if h in DOCUMENT_KINDS]
    assert kinds == list(DOCUMENT_KINDS)
    for kind, cls in DOCUMENT_KINDS.items():
        assert f"(#{kind.lower()})" in markdown
        assert " ".join((cls.__doc__ or "").split()) in markdown


def _sections(markdown: str) -> dict[str, str]:
    parts = re.split(r"^## (\w+)$", markdown, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _schema_paths(schema: dict[str, Any], node: dict[str, Any], prefix: str = "") -> list[str]:
    """Every property path of ``node``, walked in pydantic's schema (not in the generator)."""
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
    paths = []
    for key, prop in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths.append(path)
        options = [prop, *prop.get("anyOf", [])]
        for option in options:
            if "$ref" in option:
                paths += _schema_paths(schema, option, f"{path}.")
            elif "$ref" in option.get("items", {}):
                paths += _schema_paths(schema, option["items"], f"{path}[].")
    return paths


def test_every_field_alias_appears_in_its_kind_table(markdown: str, schema: dict[str, Any]) -> None:
    sections = _sections(markdown)
    for kind in DOCUMENT_KINDS:
        for path in _schema_paths(schema, {"$ref": f"#/$defs/{kind}"}):
            assert f"| `{path}` |" in sections[kind], f"{kind}: {path} is not in the reference"


def test_merge_replaced_fields_are_marked(markdown: str, schema: dict[str, Any]) -> None:
    mark = f"*{ref.REPLACED_MARK}*"
    marked = unmarked = 0
    for kind, text in _sections(markdown).items():
        if kind not in DOCUMENT_KINDS:
            continue
        rows = {
            line.split("|")[1].strip(" `"): line
            for line in text.splitlines()
            if line.startswith("| `")
        }
        for path in _schema_paths(schema, {"$ref": f"#/$defs/{kind}"}):
            replaced = _property(schema, kind, path).get("x-merge") == "replace"
            assert (mark in rows[path]) == replaced, f"{kind}.{path}"
            marked += replaced
            unmarked += not replaced
    assert marked and unmarked


def _property(schema: dict[str, Any], kind: str, path: str) -> dict[str, Any]:
    node = schema["$defs"][kind]
    prop: dict[str, Any] = {}
    for part in path.replace("[]", "").split("."):
        prop = node["properties"][part]
        target = next((o for o in [prop, *prop.get("anyOf", [])] if "$ref" in o), None)
        target = target or next((o["items"] for o in [prop] if "$ref" in o.get("items", {})), None)
        if target is not None:
            node = schema["$defs"][target["$ref"].rsplit("/", 1)[1]]
    return prop


def test_rows_show_types_defaults_and_constraints(markdown: str) -> None:
    sections = _sections(markdown)
    assert "| `network.podSubnets` | list of CIDR | required |" in sections["ClusterConfig"]
    assert "| `routes[].gateway` | IP address | required |" in sections["LinkConfig"]
    assert "| `mtu` | integer | unset | MTU in bytes. From 68 to 65535. |" in sections["LinkConfig"]
    assert "| `kubelet.nodeIP` | object | see fields |" in sections["MachineConfig"]
    assert "| `auto` | `stable` | unset |" in sections["HostnameConfig"]


def _validated_types(annotation: Any) -> list[Any]:
    """The ``Annotated[..., AfterValidator(...)]`` types inside ``annotation``."""
    found = [inner for inner in typing.get_args(annotation) for inner in _validated_types(inner)]
    if typing.get_origin(annotation) is typing.Annotated and any(
        isinstance(m, AfterValidator) for m in annotation.__metadata__
    ):
        found.append(annotation)
    return found


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = [model]
    for info in model.model_fields.values():
        for arg in [info.annotation, *typing.get_args(info.annotation)]:
            for inner in [arg, *typing.get_args(arg)]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    found += _models(inner)
    return found


def test_every_field_has_a_description() -> None:
    missing = [
        f"{model.__name__}.{name}"
        for kind in DOCUMENT_KINDS.values()
        for model in _models(kind)
        for name, info in model.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert missing == [], "fields without a description (the reference shows it)"


def test_nested_model_rows_use_dotted_and_list_paths() -> None:
    class Leaf(BaseModel):
        value: int = 1

    class Tree(BaseModel):
        leaf: Leaf | None = None
        leaves: list[Leaf] = []
        by_name: dict[str, Leaf] = {}
        again: Tree | None = None

    paths = [row.path for row in ref.field_rows(Tree)]
    assert paths == [
        "leaf",
        "leaf.value",
        "leaves",
        "leaves[].value",
        "by_name",
        "by_name.<key>.value",
        "again",
    ]


def test_every_validated_type_has_a_label() -> None:
    # A new Annotated type in _types.py needs a row in reference.TYPE_LABELS.
    for kind in DOCUMENT_KINDS.values():
        for model in _models(kind):
            for name, info in model.model_fields.items():
                where = f"{model.__name__}.{name}"
                for validated in _validated_types(info.annotation):
                    assert ref._validator_label(validated) is not None, where
                if any(isinstance(m, AfterValidator) for m in info.metadata):
                    label = ref._label_from_metadata(info.annotation, info.metadata)
                    assert label is not None, where


# -- the JSON Schema ---------------------------------------------------------------------------


def test_schema_has_every_kind_with_its_required_fields(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["oneOf"] == [{"$ref": f"#/$defs/{kind}"} for kind in DOCUMENT_KINDS]
    for kind, cls in DOCUMENT_KINDS.items():
        definition = schema["$defs"][kind]
        required = [
            info.alias or name for name, info in cls.model_fields.items() if info.is_required()
        ]
        assert definition["required"] == required
        assert {"apiVersion", "kind"} <= set(required)
        assert definition["properties"]["kind"]["const"] == kind
        assert definition["properties"]["apiVersion"]["const"] == API
        assert definition["additionalProperties"] is False


def test_schema_refuses_two_models_with_one_name(monkeypatch: pytest.MonkeyPatch) -> None:
    class Route(BaseModel):
        other: int

    class Clash(BaseModel):
        route: Route

    monkeypatch.setitem(DOCUMENT_KINDS, "Clash", Clash)  # type: ignore[arg-type]
    with pytest.raises(ref.SchemaConflictError, match="'Route'"):
        ref.schema()


_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _errors(schema: dict[str, Any], node: dict[str, Any], value: Any, at: str = "") -> list[str]:
    """The JSON Schema keywords pydantic emits, checked without the jsonschema package."""
    if "$ref" in node:
        return _errors(schema, schema["$defs"][node["$ref"].rsplit("/", 1)[1]], value, at)
    for keyword in ("anyOf", "oneOf"):
        if keyword in node:
            passing = [o for o in node[keyword] if not _errors(schema, o, value, at)]
            ok = len(passing) == 1 if keyword == "oneOf" else passing
            return [] if ok else [f"{at or '/'}: matches {len(passing)} of {keyword}"]
    kind = node.get("type")
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{at}: not an integer"]
    elif kind is not None and (
        not isinstance(value, _TYPES[kind]) or (kind != "boolean" and isinstance(value, bool))
    ):
        return [f"{at}: not {kind}"]
    errors = []
    if "const" in node and value != node["const"]:
        errors.append(f"{at}: not {node['const']!r}")
    if "enum" in node and value not in node["enum"]:
        errors.append(f"{at}: not one of {node['enum']}")
    bounded = "minimum" in node or "maximum" in node
    if bounded and not node.get("minimum", value) <= value <= node.get("maximum", value):
        errors.append(f"{at}: out of range")
    if "pattern" in node and not re.search(node["pattern"], value):
        errors.append(f"{at}: does not match {node['pattern']}")
    for low, high in (("minItems", "maxItems"), ("minLength", "maxLength")):
        sized = low in node or high in node
        if sized and not node.get(low, 0) <= len(value) <= node.get(high, len(value)):
            errors.append(f"{at}: wrong length")
    if isinstance(value, dict):
        props = node.get("properties", {})
        errors += [f"{at}/{key}: required" for key in node.get("required", []) if key not in value]
        for key, item in value.items():
            extra = node.get("additionalProperties", True)
            if key in props:
                errors += _errors(schema, props[key], item, f"{at}/{key}")
            elif extra is False:
                errors.append(f"{at}/{key}: not allowed")
            elif isinstance(extra, dict):
                errors += _errors(schema, extra, item, f"{at}/{key}")
    if isinstance(value, list) and "items" in node:
        for index, item in enumerate(value):
            errors += _errors(schema, node["items"], item, f"{at}/{index}")
    return errors


def schema_errors(schema: dict[str, Any], document: Any) -> list[str]:
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError:
        return _errors(schema, schema, document)
    validator = jsonschema.Draft202012Validator(schema)
    return [error.message for error in validator.iter_errors(document)]


def _documents(text: str) -> list[Any]:
    return load_bundle(text).to_raw()


def test_schema_accepts_generated_configs(
    schema: dict[str, Any], cp_yaml: str, worker_yaml: str
) -> None:
    for text in (cp_yaml, worker_yaml):
        for document in _documents(text):
            assert schema_errors(schema, document) == [], document["kind"]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"kind": "MachineConfg"}, "unknown kind"),
        ({"apiVersion": "basalt.dev/v1"}, "wrong apiVersion"),
        ({"instal": {}}, "unknown field"),
        ({"type": "router"}, "not a machine type"),
        ({"install": {"wipe": True}}, "install.image missing"),
        ({"certSANs": "a.example.com"}, "not a list"),
    ],
)
def test_schema_rejects_broken_documents(
    schema: dict[str, Any], cp_yaml: str, change: dict[str, Any], why: str
) -> None:
    machine = _documents(cp_yaml)[0]
    assert schema_errors(schema, {**machine, **change}), why


# -- the examples ------------------------------------------------------------------------------


def test_examples_are_documents_of_known_kinds() -> None:
    assert set(ref.EXAMPLES) <= set(DOCUMENT_KINDS)
    for kind in ref.EXAMPLES:
        for document in ref.example_documents(kind):
            DOCUMENT_KINDS[kind].model_validate(document)


def test_examples_in_the_reference_load_and_match_the_schema(
    markdown: str, schema: dict[str, Any]
) -> None:
    blocks = re.findall(r"^```yaml\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == len(ref.EXAMPLES)
    for block in blocks:
        for document in load_bundle(block, "example").to_raw():
            assert schema_errors(schema, document) == []


def test_examples_make_a_valid_config_together(cp_yaml: str) -> None:
    examples = [doc for kind in ref.EXAMPLES for doc in ref.example_documents(kind)]
    bundle = load_bundle(cp_yaml + dump_documents(examples), "examples.yaml")
    assert [p for p in check_bundle(bundle, Mode.METAL) if p.severity == "error"] == []
