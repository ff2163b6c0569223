"""The base of resource specs: frozen, keyword-only records, checked against their
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

A spec class declares its fields as a dataclass would (annotations, defaults,
``dataclasses.field(default_factory=...)``) and type checkers treat it as a frozen,
keyword-only dataclass (``dataclass_transform``). It is not one: ``@dataclass`` writes
and compiles five methods per class, which under emulation was a fifth of a second for
the specs a first boot imports; here one ``__init__``, ``__eq__``, ``__repr__`` serve
every spec, reading the field table :meth:`Spec.__init_subclass__` builds.

Supported annotations: ``str``, ``int``, ``float``, ``bool``, ``Literal[...]``,
``list[X]``, ``dict[str, X]``, ``X | None`` and nested specs.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Self, dataclass_transform

from ..errors import BasaltError

#: Checks (and normalises) one value; raises _Mismatch.
_Check = Callable[[Any, str], Any]
_MISSING: Any = dataclasses.MISSING


class SpecError(BasaltError, TypeError):
    """A spec built from a value its annotations do not allow."""


class _Mismatch(Exception):
    def __init__(self, where: str, wanted: str, value: object) -> None:
        # A number or a flag is shown; text, bytes and containers only by type: a spec
        # may hold a secret (MachineConfigSpec.yaml), and errors reach logs and clients.
        shown = f" {value!r}" if isinstance(value, int | float) or value is None else ""
        super().__init__(f"{where}: expected {wanted}, got {type(value).__name__}{shown}")


def camel(name: str) -> str:
    """``last_seen`` -> ``lastSeen``."""
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclass_transform(
    kw_only_default=True, frozen_default=True, field_specifiers=(dataclasses.field,)
)
class Spec:
    """Base of every resource spec (see the module's docstring)."""

    #: (name, default, default factory) per field, in declaration order, bases first.
    _fields: ClassVar[tuple[tuple[str, Any, Any], ...]] = ()
    #: field name -> its check, built on the first instance of each class.
    _checks: ClassVar[dict[str, _Check] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = []
        for name, annotation in inspect.get_annotations(cls).items():
            if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
                continue
            value = cls.__dict__.get(name, _MISSING)
            default, factory = value, _MISSING
            if isinstance(value, dataclasses.Field):
                default, factory = value.default, value.default_factory
                if default is _MISSING:
                    delattr(cls, name)
                else:
                    setattr(cls, name, default)
            own.append((name, default, factory))
        inherited = [f for f in cls._fields if f[0] not in {o[0] for o in own}]
        cls._fields = (*inherited, *own)
        cls._checks = None

    def __init__(self, **values: Any) -> None:
        cls = type(self)
        checks = cls.__dict__.get("_checks") or _build_checks(cls)
        missing = []
        for name, default, factory in cls._fields:
            if name in values:
                value = values.pop(name)
            elif factory is not _MISSING:
                value = factory()
            elif default is not _MISSING:
                value = default
            else:
                missing.append(repr(name))
                continue
            try:
                value = checks[name](value, f"{cls.__name__}.{name}")
            except _Mismatch as exc:
                raise SpecError(str(exc)) from None
            object.__setattr__(self, name, value)
        if values:
            raise TypeError(f"{cls.__name__}() got unexpected fields: {', '.join(values)}")
        if missing:
            raise TypeError(f"{cls.__name__}() is missing required fields: {', '.join(missing)}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def _values(self) -> Iterator[Any]:
        return (getattr(self, name) for name, _, _ in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return tuple(self._values()) == tuple(other._values())

    def __hash__(self) -> int:
        return hash((type(self), *self._values()))

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n, _, _ in self._fields)
        return f"{type(self).__name__}({shown})"

    def to_dict(self, *, by_alias: bool = True) -> dict[str, Any]:
        """A JSON-ready dict: camelCase keys (field names with ``by_alias=False``)."""
        return {
            (camel(name) if by_alias else name): _plain(getattr(self, name), by_alias)
            for name, _, _ in self._fields
        }

    def to_json(self) -> str:
        """Compact JSON with camelCase keys: what the API sends."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build from a dict keyed by camelCase or field names (nested specs as dicts too).
        Raises :class:`SpecError` naming a key the spec has not, or a field missing."""
        names = {}
        for name, _, _ in cls._fields:
            names[name] = names[camel(name)] = name
        values = {}
        for key, value in data.items():
            if key not in names:
                known = ", ".join(name for name, _, _ in cls._fields)
                raise SpecError(f"{cls.__name__}: no field {key!r} (fields: {known})")
            values[names[key]] = value
        try:
            return cls(**values)
        except SpecError:
            raise
        except TypeError as exc:  # a required field missing
            raise SpecError(str(exc)) from None

    @classmethod
    def field_keys(cls) -> dict[str, str]:
        """Field name -> its JSON key."""
        return {name: camel(name) for name, _, _ in cls._fields}


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
    checks = {name: _check_for(hints[name]) for name, _, _ in cls._fields}
    cls._checks = checks
    return checks


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
