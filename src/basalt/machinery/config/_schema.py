"""Walk the document models by YAML key: which model or field a path leads to."""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ._base import MERGE_KEY


def _aliases(model: type[BaseModel]) -> dict[str, FieldInfo]:
    return {(info.alias or name): info for name, info in model.model_fields.items()}


def field_keys(model: type[BaseModel]) -> list[str]:
    """The YAML keys a model accepts, in declaration order."""
    return list(_aliases(model))


def field_info(model: type[BaseModel], key: str) -> FieldInfo | None:
    return _aliases(model).get(key)


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` down to the interesting type."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _as_model(annotation: Any) -> type[BaseModel] | None:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def submodel(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The model class of field ``key`` when it is itself a model."""
    info = field_info(model, key)
    return _as_model(info.annotation) if info else None


def item_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """For ``list[Model]`` and ``dict[str, Model]`` fields, the item model."""
    info = field_info(model, key)
    if info is None:
        return None
    annotation = _unwrap(info.annotation)
    origin = typing.get_origin(annotation)
    if origin is list:
        return _as_model(typing.get_args(annotation)[0])
    if origin is dict:
        return _as_model(typing.get_args(annotation)[1])
    return None


def model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """Follow ``loc`` (YAML keys and list indexes) from ``model``; None when it leaves models."""
    current: type[BaseModel] | None = model
    pending_list_of: type[BaseModel] | None = None
    for part in loc:
        if current is None and pending_list_of is None:
            return None
        if isinstance(part, int) or current is None:
            # A list index, or the key of a map of models (client config contexts).
            current, pending_list_of = pending_list_of, None
            continue
        pending_list_of = item_model(current, part)
        current = submodel(current, part)
    return current


def replaces_on_merge(model: type[BaseModel] | None, key: str) -> bool:
    """True when a merge patch replaces field ``key`` instead of appending to it."""
    if model is None:
        return False
    info = field_info(model, key)
    extra = info.json_schema_extra if info else None
    return isinstance(extra, dict) and extra.get(MERGE_KEY) == "replace"
