"""Config patches: strategic merge patches and RFC 6902 JSON patches.

Strategic merge: each patch document names a ``kind`` (and ``name`` for named kinds)
and is merged into the matching document, or added when there is none. Maps merge;
lists append new items, except fields marked replace-on-merge (subnets, addresses),
which the patch replaces. ``$patch: delete`` as a field's value removes the field;
as a document's key it removes the matched document. ``$patch: replace`` inside a map
replaces that map whole.

JSON patch: a YAML/JSON list of operations applied to a single-document config.

Patches never change their input; a bad patch raises :class:`PatchError` naming the
patch, the document or operation, its line, and the reason.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..errors import BasaltError, ConfigValidationError, PatchError, Problem, format_path
from ..yamlio import RawDocument, parse_documents
from . import _schema
from ._base import API_VERSION, DOCUMENT_KINDS, document_key
from .bundle import ConfigBundle, _did_you_mean, bundle_from_raw
from .redact import scrub
from .validate import Mode, check_bundle

DIRECTIVE = "$patch"


@dataclass(frozen=True)
class MergePatch:
    """A strategic merge patch: one or more partial config documents."""

    source: str
    documents: list[RawDocument]


@dataclass(frozen=True)
class JSONPatch:
    """An RFC 6902 patch: a list of operations."""

    source: str
    operations: list[Any]
    line: int | None = None


Patch = MergePatch | JSONPatch


def parse_patch(text: str, source: str) -> Patch:
    """Parse patch text; a top-level list is a JSON patch, mappings a merge patch."""
    documents = parse_documents(text, source)
    if not documents:
        raise PatchError(
            f"{source}: the patch is empty", hint="a patch needs at least one document"
        )
    if len(documents) == 1 and isinstance(documents[0].data, list):
        return JSONPatch(source, documents[0].data, documents[0].line)
    return MergePatch(source, documents)


def load_patch(spec: str, *, index: int = 1, base_dir: Path | None = None) -> Patch:
    """Load ``@path`` from a file, or take ``spec`` itself as inline YAML."""
    if spec.startswith("@"):
        path = Path(spec[1:])
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PatchError(
                f"patch file {path} does not exist",
                hint="give the path after @, e.g. --config-patch @patch.yaml",
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PatchError(f"patch file {path} cannot be read: {exc}") from None
        return parse_patch(text, str(path))
    return parse_patch(spec, f"<inline patch {index}>")


#: Where patched values came from: (document, field path) -> (patch source, line).
Origins = dict[tuple[str, str], tuple[str, int | None]]


def apply_patches(
    documents: Sequence[dict[str, Any]],
    patches: Sequence[Patch],
    *,
    target: str = "config",
    origins: Origins | None = None,
) -> list[dict[str, Any]]:
    """Apply ``patches`` in order to deep copies of ``documents``.

    When ``origins`` is given, it is filled with the patch and line that set each
    value, so that later validation errors can point into the patch that caused them.
    """
    result = copy.deepcopy(list(documents))
    record: Origins = origins if origins is not None else {}
    for patch in patches:
        if isinstance(patch, JSONPatch):
            result = _apply_json(result, patch, target, record)
        else:
            result = _apply_merge(result, patch, record)
    return result


def blame(problems: Iterable[Problem], origins: Origins) -> list[Problem]:
    """Point each problem at the patch line that set the value, when a patch did."""
    out = []
    for problem in problems:
        best: tuple[str, int | None] | None = None
        best_len = -1
        for (document, path), origin in origins.items():
            if document != problem.document or len(path) <= best_len:
                continue
            if (
                not path
                or problem.path == path
                or problem.path.startswith((f"{path}.", f"{path}["))
            ):
                best, best_len = origin, len(path)
        out.append(replace(problem, source=best[0], line=best[1]) if best else problem)
    return out


def patch_and_check(
    documents: Sequence[dict[str, Any]],
    patches: Sequence[Patch],
    *,
    target: str,
    mode: Mode | None = None,
    complete: bool = True,
) -> tuple[ConfigBundle, list[Problem]]:
    """Apply patches, then validate the result; errors point at the patch lines that caused them.

    Returns the bundle and its warnings; raises :class:`ConfigValidationError` on errors.
    """
    origins: Origins = {}
    patched = apply_patches(documents, patches, target=target, origins=origins)
    try:
        bundle = bundle_from_raw(patched, source=target)
        warnings = check_bundle(bundle, mode, complete=complete)
    except ConfigValidationError as exc:
        raise ConfigValidationError(blame(exc.problems, origins), source=target) from None
    return bundle, blame(warnings, origins)


# -- strategic merge ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _At:
    """The patch document being applied, for error messages that point into it."""

    patch: MergePatch
    index: int
    raw: RawDocument
    origins: Origins
    label: str = ""

    def record(self, loc: tuple[Any, ...]) -> None:
        self.origins[(self.label, format_path(loc))] = (self.patch.source, self.raw.line_of(loc))

    def fail(self, loc: tuple[Any, ...], reason: str, hint: str | None = None) -> PatchError:
        line = self.raw.line_of(loc)
        where = f"document {self.index + 1}" + (f" (line {line})" if line else "")
        return PatchError(f"{self.patch.source}: {where}: {reason}", hint=hint)


def _find(documents: list[dict[str, Any]], kind: str, name: Any, named: bool) -> int | None:
    for i, doc in enumerate(documents):
        if doc.get("kind") == kind and (not named or doc.get("name") == name):
            return i
    return None


def _apply_merge(
    documents: list[dict[str, Any]], patch: MergePatch, origins: Origins
) -> list[dict[str, Any]]:
    for index, raw in enumerate(patch.documents):
        at = _At(patch, index, raw, origins)
        data = raw.data
        if not isinstance(data, dict):
            raise at.fail(
                (),
                "must be a mapping with apiVersion and kind",
                "a merge patch is a partial config document; a JSON patch is one list",
            )
        kind = data.get("kind")
        if not isinstance(kind, str) or kind not in DOCUMENT_KINDS:
            what = "has no kind" if kind is None else f"unknown kind {kind!r}"
            hint = _did_you_mean(kind, DOCUMENT_KINDS) if isinstance(kind, str) else None
            raise at.fail(("kind",), what, hint or f"one of: {', '.join(DOCUMENT_KINDS)}")
        api = data.get("apiVersion")
        if api is not None and api != API_VERSION:
            raise at.fail(
                ("apiVersion",),
                f"apiVersion {api!r} is not supported",
                f"use apiVersion: {API_VERSION}",
            )
        model = DOCUMENT_KINDS[kind]
        name = data.get("name")
        if model.named and not isinstance(name, str):
            raise at.fail((), f"{kind} patches must say which document: name: ...")
        label = f"{kind}({name})" if model.named else kind
        at = replace(at, label=label)
        found = _find(documents, kind, name, model.named)
        directive = data.get(DIRECTIVE)
        if directive == "delete":
            if found is None:
                raise at.fail(
                    (DIRECTIVE,),
                    f"nothing to delete: no {label}",
                    "check the kind and name against the config",
                )
            del documents[found]
            continue
        if directive is not None:
            raise at.fail(
                (DIRECTIVE,),
                f"unknown directive {directive!r}",
                "documents take only '$patch: delete'",
            )
        body = {"apiVersion": API_VERSION, **data}
        if found is None:
            for loc in [(), *raw.positions]:
                at.record(loc)
            documents.append(_strip(body, at, ()))
        else:
            documents[found] = _merge(documents[found], body, model, at, ())
    return documents


def _directive(value: Any) -> Any:
    return value.get(DIRECTIVE) if isinstance(value, dict) else None


_DIRECTIVE_HINT = "fields take '$patch: delete'; maps take '$patch: replace'"


def _strip(value: Any, at: _At, loc: tuple[Any, ...]) -> Any:
    """A copy of patch data for content that is added whole: directives resolved."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if _directive(item) == "delete":
                continue
            if key == DIRECTIVE and loc:
                if item != "replace":
                    raise at.fail((*loc, key), f"unknown directive {item!r}", _DIRECTIVE_HINT)
                continue
            out[key] = _strip(item, at, (*loc, key))
        return out
    if isinstance(value, list):
        return [_strip(v, at, (*loc, i)) for i, v in enumerate(value)]
    return copy.deepcopy(value)


def _merge(
    target: dict[str, Any],
    change: dict[str, Any],
    model: type[BaseModel] | None,
    at: _At,
    loc: tuple[Any, ...],
) -> dict[str, Any]:
    result = dict(target)
    for key, value in change.items():
        if key == DIRECTIVE:
            continue
        here = (*loc, key)
        directive = _directive(value)
        current = result.get(key)
        if directive == "delete":
            if len(value) > 1:
                raise at.fail(here, "'$patch: delete' takes no other keys")
            result.pop(key, None)
        elif directive not in (None, "replace"):
            raise at.fail((*here, DIRECTIVE), f"unknown directive {directive!r}", _DIRECTIVE_HINT)
        elif directive is None and isinstance(current, dict) and isinstance(value, dict):
            sub = _schema.submodel(model, key) if model else None
            result[key] = _merge(current, value, sub, at, here)
        elif (
            directive is None
            and isinstance(current, list)
            and isinstance(value, list)
            and not _schema.replaces_on_merge(model, key)
        ):
            added = _strip(value, at, here)
            result[key] = current + [item for item in added if item not in current]
            at.record(here)
        else:
            result[key] = _strip(value, at, here)
            at.record(here)
    return result


# -- JSON patch ------------------------------------------------------------------------------------


def _pointer_loc(pointer: Any) -> tuple[str | int, ...]:
    if not isinstance(pointer, str):
        return ()
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    # isdigit() alone also accepts digits such as '²' that int() refuses
    return tuple(int(p) if p.isascii() and p.isdigit() else p for p in parts)


def _apply_json(
    documents: list[dict[str, Any]], patch: JSONPatch, target: str, origins: Origins
) -> list[dict[str, Any]]:
    import jsonpatch
    import jsonpointer

    if len(documents) != 1:
        raise PatchError(
            f"{patch.source}: JSON patches apply to single-document configs; "
            f"{target} has {len(documents)} documents",
            hint="write a strategic merge patch instead: a YAML document with apiVersion, kind "
            "and only the fields to change",
        )
    document: Any = documents[0]
    for number, operation in enumerate(patch.operations, start=1):
        label = f"operation {number}"
        if isinstance(operation, dict):
            label += f" ({operation.get('op')} {operation.get('path')})"
        try:
            if not isinstance(operation, dict):
                raise PatchError("each operation is a mapping with op and path")
            document = jsonpatch.JsonPatch([operation]).apply(document, in_place=False)
            if isinstance(document, dict):
                owner = document_key(str(document.get("kind")), document.get("name"))
                origins[(owner, format_path(_pointer_loc(operation.get("path"))))] = (
                    patch.source,
                    patch.line,
                )
        except (
            jsonpatch.JsonPatchException,
            jsonpointer.JsonPointerException,
            BasaltError,
            TypeError,
            KeyError,
            IndexError,
            ValueError,
            AttributeError,
        ) as exc:
            raise PatchError(
                f"{patch.source}: {label}: {_operation_error(exc, document)}",
                hint="JSON pointers look like /kind or /install/disk; the target path must exist "
                "for remove, replace, move, copy and test",
            ) from None
    if not isinstance(document, dict):
        raise PatchError(f"{patch.source}: the patched document is not a mapping any more")
    return [document]


def _operation_error(exc: Exception, document: Any) -> str:
    """Why an operation failed, without the values it saw: the libraries quote the tested
    value or a whole sub-document, which may hold keys (redact.scrub removes any left)."""
    import jsonpatch

    if isinstance(exc, jsonpatch.JsonPatchTestFailed):
        return "the value there is not the value the test expects"
    text = str(exc)
    if " not found in " in text:
        text = text.split(" not found in ", 1)[0] + " not found"
    elif text.startswith("Document '"):
        text = "a value on the path is neither a mapping nor a list"
    raw = [document] if isinstance(document, dict) else []
    return scrub(text, raw).strip() or type(exc).__name__
