"""The base of resource specs: frozen, keyword-only dataclasses, checked against their
annotations when built and sent as camelCase JSON.

Specs are built in code (controllers) from values the node reads, published in the
resource store and sent to clients as JSON. They were pydantic models; a node's first
boot publishes resources long before anything else needs pydantic, and under emulation
importing it and building a schema per spec cost about a second before the API opened
(issue 22). What pydantic gave specs is kept here, in the standard library:

- a value of the wrong type is an error when the spec is built (:class:`SpecError`,
  naming ``Spec.field[index]`` and what was given), not a surprise in a client;
  an int is taken where a float is declared (stored as a float);
- lists are copied when the spec is built: a spec never changes after it is stored,
  even when the code that built it keeps changing its own list;
- JSON keys are the field names in camelCase (``to_json``, ``to_dict``), and
  ``from_dict`` reads either spelling back, refusing keys the spec does not have.

Supported annotations: ``str``, ``int``, ``float``, ``bool``, ``Literal[...]``,
``list[X]``, ``dict[str, X]``, ``X | None`` and nested specs.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self, TypeVar

from ..errors import BasaltError

#: Checks (and normalises) one value; raises _Mismatch.
_Check = Callable[[Any, str], Any]
_S = TypeVar("_S", bound="Spec")


class SpecError(BasaltError, TypeError):
    """A spec built from a value its annotations do not allow."""


class _Mismatch(Exception):
    def __init__(self, where: str, wanted: str, value: object) -> None:
        super().__init__(f"{where}: expected {wanted}, got {type(value).__name__} {value!r:.60}")


def camel(name: str) -> str:
    """``last_seen`` -> ``lastSeen``."""
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


class Spec:
    """Base of every resource spec. Subclasses are ``@dataclass(frozen=True, kw_only=True)``."""

    #: field name -> its check, built on the first instance of each class.
    _checks: ClassVar[dict[str, _Check]]

    def __post_init__(self) -> None:
        cls = type(self)
        checks = cls.__dict__.get("_checks")
        if checks is None:
            checks = _build_checks(cls)
            cls._checks = checks
        for name, check in checks.items():
            value = getattr(self, name)
            try:
                checked = check(value, f"{cls.__name__}.{name}")
            except _Mismatch as exc:
                raise SpecError(str(exc)) from None
            if checked is not value:
                object.__setattr__(self, name, checked)

    def to_dict(self, *, by_alias: bool = True) -> dict[str, Any]:
        """A JSON-ready dict: camelCase keys (field names with ``by_alias=False``)."""
        return {
            (camel(f.name) if by_alias else f.name): _plain(getattr(self, f.name), by_alias)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }

    def to_json(self) -> str:
        """Compact JSON with camelCase keys: what the API sends."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build from a dict keyed by camelCase or field names (nested specs as dicts too).
        Raises :class:`SpecError` naming a key the spec has not."""
        names = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            names[f.name] = names[camel(f.name)] = f.name
        values = {}
        for key, value in data.items():
            if key not in names:
                raise SpecError(f"{cls.__name__}: no field {key!r} (fields: {', '.join(names)})")
            values[names[key]] = value
        try:
            return cls(**values)
        except TypeError as exc:  # a required field missing
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"{cls.__name__}: {exc}") from None

    @classmethod
    def field_keys(cls) -> dict[str, str]:
        """Field name -> its JSON key."""
        return {f.name: camel(f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def _plain(value: Any, by_alias: bool) -> Any:
    if isinstance(value, Spec):
        return value.to_dict(by_alias=by_alias)
    if isinstance(value, list):
        return [_plain(v, by_alias) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, by_alias) for k, v in value.items()}
    return value


def _build_checks(cls: type[Spec]) -> dict[str, _Check]:
    hints = typing.get_type_hints(cls)
    return {f.name: _check_for(hints[f.name]) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def _scalar(hint: Any) -> _Check | None:
    """The check of ``str``, ``bool``, ``int``, ``float`` or ``Any``; None for others."""
    if hint is Any:
        return lambda value, _where: value
    if hint is bool or hint is str:

        def exact(value: Any, where: str) -> Any:
            if not isinstance(value, hint):
                raise _Mismatch(where, hint.__name__, value)
            return value

        return exact
    if hint is int:

        def integer(value: Any, where: str) -> Any:
            if not isinstance(value, int) or isinstance(value, bool):
                raise _Mismatch(where, "int", value)
            return value

        return integer
    if hint is float:

        def real(value: Any, where: str) -> Any:
            if isinstance(value, float):
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            raise _Mismatch(where, "float", value)

        return real
    return None


def _check_for(hint: Any) -> _Check:
    scalar = _scalar(hint)
    if scalar is not None:
        return scalar
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)

        def literal(value: Any, where: str) -> Any:
            if value not in allowed or type(value) not in {type(a) for a in allowed}:
                raise _Mismatch(where, " or ".join(repr(a) for a in allowed), value)
            return value

        return literal
    if origin is list:
        (item,) = typing.get_args(hint)
        each = _check_for(item)

        def listing(value: Any, where: str) -> Any:
            if not isinstance(value, list | tuple):
                raise _Mismatch(where, "list", value)
            return [each(v, f"{where}[{i}]") for i, v in enumerate(value)]

        return listing
    if origin is dict:
        key_type, item = typing.get_args(hint)
        keys, each = _check_for(key_type), _check_for(item)

        def mapping(value: Any, where: str) -> Any:
            if not isinstance(value, Mapping):
                raise _Mismatch(where, "mapping", value)
            return {keys(k, where): each(v, f"{where}[{k!r}]") for k, v in value.items()}

        return mapping
    if origin is typing.Union or origin is types.UnionType:
        options = typing.get_args(hint)
        checks = [_check_for(o) for o in options if o is not type(None)]
        optional = type(None) in options

        def union(value: Any, where: str) -> Any:
            if value is None and optional:
                return None
            for check in checks:
                try:
                    return check(value, where)
                except _Mismatch:
                    pass
            raise _Mismatch(
                where, " | ".join(getattr(o, "__name__", str(o)) for o in options), value
            )

        return union
    if isinstance(hint, type) and issubclass(hint, Spec):
        nested: type[Spec] = hint

        def spec(value: Any, where: str) -> Any:
            if isinstance(value, nested):
                return value
            if isinstance(value, Mapping):
                try:
                    return nested.from_dict(value)
                except SpecError as exc:
                    raise _Mismatch(where, f"{nested.__name__} ({exc})", value) from None
            raise _Mismatch(where, nested.__name__, value)

        return spec
    raise TypeError(f"resource specs cannot hold {hint!r}")
