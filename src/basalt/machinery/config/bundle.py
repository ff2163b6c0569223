"""A loaded machine config: its documents, where they came from, and how to dump it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import ConfigValidationError, Problem, Severity, format_path
from ..yamlio import Loc, RawDocument, dump_documents, parse_documents
from . import _schema, network, system  # noqa: F401  (registers their document kinds)
from ._base import API_VERSION, DOCUMENT_KINDS, Document
from .cluster import ClusterConfig
from .machine import MachineConfig

T = TypeVar("T", bound=Document)

_REFERENCE = "see docs/reference/config.md"


@dataclass
class ConfigBundle:
    """The documents of one machine config, in file order.

    ``raw`` keeps the parsed documents (with line numbers) when the bundle was
    loaded from text, so that later checks can point at lines too.
    """

    documents: list[Document]
    source: str | None = None
    raw: list[RawDocument] = field(default_factory=list)

    # -- lookups ---------------------------------------------------------------------
    def all(self, kind: type[T]) -> list[T]:
        return [d for d in self.documents if isinstance(d, kind)]

    def first(self, kind: type[T]) -> T | None:
        found = self.all(kind)
        return found[0] if found else None

    @property
    def machine(self) -> MachineConfig:
        found = self.first(MachineConfig)
        if found is None:
            raise ConfigValidationError(
                [Problem("MachineConfig", "", "document is missing", source=self.source)],
                source=self.source,
            )
        return found

    @property
    def cluster(self) -> ClusterConfig:
        found = self.first(ClusterConfig)
        if found is None:
            raise ConfigValidationError(
                [Problem("ClusterConfig", "", "document is missing", source=self.source)],
                source=self.source,
            )
        return found

    # -- problems with positions ---------------------------------------------------------
    def problem(
        self,
        document: Document | str,
        loc: Loc,
        message: str,
        hint: str | None = None,
        severity: Severity = "error",
    ) -> Problem:
        """A Problem about ``loc`` in ``document``, with its line when known."""
        line = None
        if isinstance(document, Document):
            name = document.display_name
            index = next((i for i, d in enumerate(self.documents) if d is document), None)
            if index is not None and index < len(self.raw):
                line = self.raw[index].line_of(loc)
        else:
            name = document
        return Problem(name, format_path(loc), message, hint, severity, self.source, line)

    # -- output ----------------------------------------------------------------------------
    def to_raw(self) -> list[dict[str, Any]]:
        return [document_to_raw(d) for d in self.documents]

    def to_yaml(self) -> str:
        return dump_documents(self.to_raw())


def _prune(value: Any) -> Any:
    if isinstance(value, dict):
        pruned = {k: _prune(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in pruned.items() if v not in ({}, [])}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def document_to_raw(document: Document) -> dict[str, Any]:
    """The document as YAML-ready data: aliases, no nulls, no empty lists or maps."""
    data = _prune(document.model_dump(mode="json", by_alias=True))
    assert isinstance(data, dict)
    return data


# -- loading ----------------------------------------------------------------------------------


def _did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def _error_loc(loc: Sequence[str | int], kind: str) -> Loc:
    # pydantic marks dict-key errors with a trailing "[key]" part; the key is the part before.
    # Only that marker goes: a user's own key may be spelled "[key]" too, and an unknown
    # field (extra_forbidden) is never a key error.
    if kind != "extra_forbidden" and len(loc) > 1 and loc[-1] == "[key]":
        return tuple(loc[:-1])
    return tuple(loc)


#: pydantic error type -> (message, hint); formatted with the error's context.
_MESSAGES: dict[str, tuple[str, str | None]] = {
    "missing": ("required field is missing", _REFERENCE),
    "string_type": ("must be a string", 'quote the value in YAML, e.g. "0.1" or "1"'),
    "model_type": ("must be a mapping of fields", _REFERENCE),
    "model_attributes_type": ("must be a mapping of fields", _REFERENCE),
    "dict_type": ("must be a mapping", "write it as key: value lines"),
    "list_type": ("must be a list", "write it as a YAML list (- item)"),
    "bool_type": ("must be true or false", None),
    "bool_parsing": ("must be true or false", None),
    "int_type": ("must be a whole number", None),
    "int_parsing": ("must be a whole number", None),
    "int_from_float": ("must be a whole number", None),
    "greater_than_equal": ("must be at least {ge}", None),
    "less_than_equal": ("must be at most {le}", None),
    "too_short": ("needs at least {min_length} item(s)", None),
    "too_long": ("allows at most {max_length} item(s)", None),
    "string_too_short": ("must be at least {min_length} character(s)", None),
    "string_too_long": ("must be at most {max_length} characters", None),
    "string_pattern_mismatch": ("does not match the pattern {pattern}", None),
    "literal_error": ("must be {expected}", None),
}


def translate_error(model: type[BaseModel], error: Any) -> tuple[Loc, str, str | None]:
    """One pydantic error -> (field path, message, hint)."""
    kind = error["type"]
    loc = _error_loc(error["loc"], kind)
    ctx = error.get("ctx") or {}
    if kind == "basalt":
        return loc, str(ctx["message"]), str(ctx.get("hint") or "") or None
    if kind == "extra_forbidden":
        parent = _schema.model_at(model, loc[:-1])
        choices = _schema.field_keys(parent) if parent else []
        suggestion = _did_you_mean(str(loc[-1]), choices) or (
            f"allowed here: {', '.join(choices)}" if choices else _REFERENCE
        )
        return loc, f"unknown field {loc[-1]!r}", suggestion
    if kind in _MESSAGES:
        message, hint = _MESSAGES[kind]
        try:
            return loc, message.format(**ctx), hint
        except (KeyError, IndexError):
            pass
    return loc, str(error["msg"]), None


def _check_header(raw: RawDocument, index: int, source: str | None) -> list[Problem]:
    label = f"document {index + 1}"
    data = raw.data
    if not isinstance(data, dict):
        return [
            Problem(
                label,
                "",
                f"must be a mapping, got {type(data).__name__}",
                "each YAML document is one config document with apiVersion and kind",
                source=source,
                line=raw.line,
            )
        ]
    problems = []
    kind = data.get("kind")
    if not isinstance(kind, str) or not kind:
        problems.append(
            Problem(
                label,
                "kind",
                "missing or not a string",
                f"one of: {', '.join(DOCUMENT_KINDS)}",
                source=source,
                line=raw.line_of(("kind",)),
            )
        )
    elif kind not in DOCUMENT_KINDS:
        problems.append(
            Problem(
                label,
                "kind",
                f"unknown kind {kind!r}",
                _did_you_mean(kind, DOCUMENT_KINDS) or f"one of: {', '.join(DOCUMENT_KINDS)}",
                source=source,
                line=raw.line_of(("kind",)),
            )
        )
    api = data.get("apiVersion")
    if api != API_VERSION:
        what = "missing" if api is None else f"{api!r} is not supported"
        problems.append(
            Problem(
                # kind may be any YAML value here, even an unhashable list or map
                kind if isinstance(kind, str) and kind in DOCUMENT_KINDS else label,
                "apiVersion",
                what,
                f"use apiVersion: {API_VERSION}",
                source=source,
                line=raw.line_of(("apiVersion",)),
            )
        )
    return problems


def build_bundle(raws: list[RawDocument], source: str | None) -> ConfigBundle:
    """Validate each raw document against its kind's model; every problem is reported.

    Raises :class:`ConfigValidationError` listing all problems; returns the bundle otherwise.
    """
    problems: list[Problem] = []
    documents: list[Document] = []
    seen: dict[str, int | None] = {}
    for index, raw in enumerate(raws):
        header = _check_header(raw, index, source)
        if header:
            problems.extend(header)
            continue
        model = DOCUMENT_KINDS[raw.data["kind"]]
        name = raw.data.get("name") if model.named else None
        display = f"{model.kind_name()}({name})" if model.named and name else model.kind_name()
        try:
            document = model.model_validate(raw.data)
        except ValidationError as exc:
            errors = [translate_error(model, error) for error in exc.errors()]
            for loc, message, hint in sorted(errors, key=lambda e: raw.line_of(e[0]) or 0):
                problems.append(
                    Problem(
                        display,
                        format_path(loc),
                        message,
                        hint,
                        source=source,
                        line=raw.line_of(loc),
                    )
                )
            continue
        key = document.display_name
        if key in seen:
            problems.append(
                Problem(
                    key,
                    "",
                    "appears twice" + (f" (first at line {seen[key]})" if seen[key] else ""),
                    "merge the two documents into one",
                    source=source,
                    line=raw.line,
                )
            )
            continue
        seen[key] = raw.line
        documents.append(document)
    ConfigValidationError.raise_if_errors(problems, source=source)
    return ConfigBundle(documents, source, list(raws))


def load_bundle(text: str, source: str | None = None) -> ConfigBundle:
    """Parse and validate a multi-document config text. Errors name ``source`` and lines."""
    return build_bundle(parse_documents(text, source), source)


def bundle_from_raw(documents: Iterable[dict[str, Any]], source: str | None = None) -> ConfigBundle:
    """Validate documents that are already data (generated or patched)."""
    return build_bundle([RawDocument(d, None) for d in documents], source)
