"""Secrets in outputs: one mechanism, driven by the config model.

A field is secret when its model marks it (``json_schema_extra=secret()``: private keys,
tokens, the cluster secret, the secretbox key). Every output that may reach someone who did
not ask for secrets — diffs and dry runs, events, logs, errors, ``get machineconfig`` for
roles below ``os:admin`` — shows such a field only as ``(secret)``, or ``(secret, changed)``
where it differs from the value it is compared with; never its value.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cache
from typing import Any

from pydantic import BaseModel

from . import _schema
from ._base import DOCUMENT_KINDS, SECRET_KEY

__all__ = [
    "ANY",
    "CHANGED",
    "SECRET",
    "redact_config_text",
    "redact_document",
    "redacted_yaml",
    "scrub",
    "secret_locs",
    "secret_values",
]

#: What a secret shows as; and as in a diff where it changed.
SECRET = "(secret)"
CHANGED = "(secret, changed)"
#: In a path from :func:`secret_locs`: any list index or map key.
ANY = "*"

Loc = tuple[str, ...]


def _is_secret(model: type[BaseModel], key: str) -> bool:
    info = _schema.field_info(model, key)
    extra = info.json_schema_extra if info else None
    return isinstance(extra, dict) and extra.get(SECRET_KEY) is True


@cache
def secret_locs(model: type[BaseModel]) -> tuple[Loc, ...]:
    """The YAML key paths of every secret field below ``model`` (:data:`ANY` for a list
    index or a map key), e.g. ``("ca", "key")`` in ``MachineConfig``."""
    return tuple(_secret_locs(model, ()))


def _secret_locs(model: type[BaseModel], stack: tuple[type[BaseModel], ...]) -> list[Loc]:
    found: list[Loc] = []
    stack = (*stack, model)  # a model that contains itself is walked once
    for key in _schema.field_keys(model):
        if _is_secret(model, key):
            found.append((key,))
            continue
        inner = _schema.submodel(model, key)
        if inner is not None and inner not in stack:
            found += [(key, *rest) for rest in _secret_locs(inner, stack)]
        items = _schema.item_model(model, key)
        if items is not None and items not in stack:
            found += [(key, ANY, *rest) for rest in _secret_locs(items, stack)]
    return found


def _locs_of(kind: str) -> tuple[Loc, ...]:
    model = DOCUMENT_KINDS.get(kind)
    return secret_locs(model) if model is not None else ()


def _walk(node: Any, loc: Loc, at: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """The concrete paths in ``node`` that ``loc`` names (present ones only)."""
    if not loc:
        yield at
        return
    head, rest = loc[0], loc[1:]
    if head == ANY:
        if isinstance(node, list):
            for index, item in enumerate(node):
                yield from _walk(item, rest, (*at, index))
        elif isinstance(node, dict):
            for key, item in node.items():
                yield from _walk(item, rest, (*at, key))
    elif isinstance(node, dict) and head in node:
        yield from _walk(node[head], rest, (*at, head))


def _get(node: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        if isinstance(node, dict):
            if part not in node:
                return None
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return None
    return node


def _set(node: Any, path: tuple[str | int, ...], value: Any) -> None:
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def redact_document(raw: dict[str, Any], against: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of the raw document ``raw`` (a mapping with ``kind``) with every secret value
    replaced by :data:`SECRET`, or by :data:`CHANGED` where ``against`` (the same document
    before a change) holds another value there. ``raw`` is not changed."""
    locs = _locs_of(str(raw.get("kind")))
    if not locs:
        return raw
    out = copy.deepcopy(raw)
    for loc in locs:
        for path in list(_walk(out, loc)):
            if _get(out, path) is None:
                continue
            changed = against is not None and _get(against, path) != _get(raw, path)
            _set(out, path, CHANGED if changed else SECRET)
    return out


def secret_values(raw_documents: list[dict[str, Any]]) -> list[str]:
    """Every secret value in these raw documents (to scrub texts, and for tests)."""
    values: list[str] = []
    for raw in raw_documents:
        for loc in _locs_of(str(raw.get("kind"))):
            for path in _walk(raw, loc):
                value = _get(raw, path)
                if isinstance(value, str) and value:
                    values.append(value)
    return values


def scrub(text: str, raw_documents: list[dict[str, Any]]) -> str:
    """``text`` with any secret value of these documents (or any line of a multi-line one,
    such as a PEM block) replaced by :data:`SECRET`: the last line of defence for texts
    built from values, such as a library's error message."""
    pieces: set[str] = set()
    for value in secret_values(raw_documents):
        pieces.add(value)
        pieces.update(
            line.strip()
            for line in value.splitlines()
            if len(line.strip()) >= 16 and not line.startswith("-----")
        )
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, SECRET)
    return text


def redacted_yaml(raw_documents: list[dict[str, Any]]) -> str:
    """The documents as YAML, every secret shown as :data:`SECRET`."""
    from ..yamlio import dump_documents

    return dump_documents([redact_document(raw) for raw in raw_documents])


def redact_config_text(text: str) -> str:
    """A machine config's YAML text with every secret shown as :data:`SECRET` (for readers
    of a config the node runs: it parsed once, so it parses again)."""
    import yaml

    documents = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    return redacted_yaml(documents)
