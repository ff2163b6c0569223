"""JSONPath templates for ``basaltctl get -o jsonpath=TEMPLATE``: kubectl's subset.

A template is text with expressions in braces, printed with each expression replaced by
the values it selects (several values are separated by spaces; a list or an object is
printed as JSON; a key that is missing prints nothing)::

    {.spec.address}                    a field
    {.spec.partitions[0].label}        an item of a list (negative counts from the end)
    {.spec.partitions[1:3]}            a slice
    {.items[*].metadata.id}            every item ('.*' does the same for objects)
    {..label}                          every field named label, at any depth
    {['my.key']}                       a key that is not a plain name
    {range .items[*]}{.metadata.id}{"\\n"}{end}
                                       the template between range and end, once per value
    {"\\t"}                            a string (\\n, \\t, \\\\ and \\" are escapes)

``$`` (the root) and ``@`` (the current value) may start a path. Filters and functions are
not supported. Errors name the position in the template (counted from 1).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from basalt.machinery.errors import BasaltError

__all__ = ["JsonPathError", "Template", "compile_template"]


class JsonPathError(BasaltError):
    """A template that does not parse; the message names the position."""


_NAME = re.compile(r"[A-Za-z0-9_-]+")
_INDEX = re.compile(r"\[\s*(-?\d*)\s*(?::\s*(-?\d*)\s*)?\]")
_QUOTED = re.compile(r"\[\s*(['\"])(.*?)\1\s*\]")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


@dataclass(frozen=True)
class Step:
    """One step of a path: ``field`` (a key, or ``*``), ``descend`` (``..name``),
    ``index``/``slice`` (``[n]``, ``[a:b]``), ``all`` (``[*]``)."""

    kind: str
    key: str = ""
    start: int | None = None
    stop: int | None = None


@dataclass
class Node:
    """A piece of template: ``text``, a ``path`` to print, or a ``range`` with a body."""

    kind: str
    text: str = ""
    steps: tuple[Step, ...] = ()
    body: list[Node] = field(default_factory=list)


def _fail(template: str, position: int, what: str) -> JsonPathError:
    pointer = " " * position + "^"
    return JsonPathError(
        f"jsonpath template: {what} at position {position + 1}:\n    {template}\n    {pointer}",
        hint="e.g. -o jsonpath='{.spec.address}' or "
        "'{range .items[*]}{.metadata.id}{\"\\n\"}{end}' (the subset: docs/toolbox.md)",
    )


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), text)


def _parse_path(template: str, text: str, offset: int) -> tuple[Step, ...]:
    """The steps of ``text`` (an expression found at ``offset`` of the template)."""
    steps: list[Step] = []
    i = 0
    if text[:1] in ("$", "@"):
        i = 1
    if i == len(text):
        return ()
    while i < len(text):
        rest = text[i:]
        if rest.startswith(".."):
            name = _NAME.match(text, i + 2)
            if name is None:
                raise _fail(template, offset + i + 2, "a field name must follow '..'")
            steps.append(Step("descend", name.group()))
            i = name.end()
        elif rest.startswith(".*"):
            steps.append(Step("all"))
            i += 2
        elif rest.startswith("."):
            name = _NAME.match(text, i + 1)
            if name is None:
                if i + 1 == len(text) and not steps:
                    i += 1  # '{.}': the value itself
                    continue
                raise _fail(template, offset + i + 1, "a field name must follow '.'")
            steps.append(Step("field", name.group()))
            i = name.end()
        elif rest.startswith("[*]"):
            steps.append(Step("all"))
            i += 3
        elif quoted := _QUOTED.match(text, i):
            steps.append(Step("field", quoted.group(2)))
            i = quoted.end()
        elif (index := _INDEX.match(text, i)) and (index.group(1) or index.group(2) is not None):
            first, second = index.group(1), index.group(2)
            if second is None:
                steps.append(Step("index", start=int(first)))
            else:
                steps.append(
                    Step(
                        "slice",
                        start=int(first) if first else None,
                        stop=int(second) if second else None,
                    )
                )
            i = index.end()
        elif rest.startswith("[?"):
            raise _fail(template, offset + i, "filters ([?(...)]) are not supported")
        else:
            raise _fail(template, offset + i, f"unexpected {text[i]!r}")
    return tuple(steps)


def _expression(template: str, text: str, offset: int) -> Node:
    stripped = text.strip()
    lead = offset + len(text) - len(text.lstrip())
    if not stripped:
        raise _fail(template, offset, "an empty expression")
    if stripped == "end":
        return Node("end")
    if stripped.startswith("range ") or stripped == "range":
        path = stripped[5:]
        if not path.strip():
            raise _fail(template, lead + 5, "'range' needs a path")
        where = lead + 5 + len(path) - len(path.lstrip())
        return Node("range", steps=_parse_path(template, path.strip(), where))
    if stripped.startswith('"'):
        string = _STRING.fullmatch(stripped)
        if string is None:
            raise _fail(template, lead, "a string that does not end")
        return Node("text", text=_unescape(string.group(1)))
    if stripped[0] not in ".[$@":
        word = _NAME.match(stripped)
        what = f"unknown word {word.group()!r}" if word else f"unexpected {stripped[0]!r}"
        raise _fail(template, lead, f"{what} (a path starts with '.')")
    return Node("path", steps=_parse_path(template, stripped, lead))


def _tokens(template: str) -> list[tuple[Node, int]]:
    """The template's pieces with the position of each."""
    pieces: list[tuple[Node, int]] = []
    i = 0
    while i < len(template):
        opening = template.find("{", i)
        closing = template.find("}", i)
        if closing != -1 and (opening == -1 or closing < opening):
            raise _fail(template, closing, "a '}' with no '{'")
        if opening == -1:
            pieces.append((Node("text", text=template[i:]), i))
            break
        if opening > i:
            pieces.append((Node("text", text=template[i:opening]), i))
        end = _closing_brace(template, opening)
        pieces.append((_expression(template, template[opening + 1 : end], opening + 1), opening))
        i = end + 1
    return pieces


def _closing_brace(template: str, opening: int) -> int:
    """The '}' ending the expression opened at ``opening`` (skipping quoted strings)."""
    i = opening + 1
    quote = ""
    while i < len(template):
        char = template[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "{":
            raise _fail(template, i, "a '{' inside an expression")
        elif char == "}":
            return i
        i += 1
    raise _fail(template, opening, "a '{' that is never closed")


def _nest(template: str, pieces: list[tuple[Node, int]]) -> list[Node]:
    root: list[Node] = []
    stack: list[tuple[list[Node], int]] = [(root, -1)]
    for node, position in pieces:
        if node.kind == "end":
            if len(stack) == 1:
                raise _fail(template, position, "an {end} with no {range}")
            stack.pop()
        else:
            stack[-1][0].append(node)
            if node.kind == "range":
                stack.append((node.body, position))
    if len(stack) > 1:
        raise _fail(template, stack[-1][1], "a {range} with no {end}")
    return root


def _descend(value: Any, key: str) -> list[Any]:
    found = []
    if isinstance(value, dict):
        if key in value:
            found.append(value[key])
        for child in value.values():
            found += _descend(child, key)
    elif isinstance(value, list):
        for child in value:
            found += _descend(child, key)
    return found


def _step(values: list[Any], step: Step) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if step.kind == "field":
            if isinstance(value, dict) and step.key in value:
                out.append(value[step.key])
        elif step.kind == "descend":
            out += _descend(value, step.key)
        elif step.kind == "all":
            if isinstance(value, list):
                out += value
            elif isinstance(value, dict):
                out += list(value.values())
        elif isinstance(value, list):
            if step.kind == "index":
                assert step.start is not None
                if -len(value) <= step.start < len(value):
                    out.append(value[step.start])
            else:
                out += value[step.start : step.stop]
    return out


def select(value: Any, steps: tuple[Step, ...]) -> list[Any]:
    """The values ``steps`` select from ``value``."""
    values = [value]
    for step in steps:
        values = _step(values, step)
    return values


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class Template:
    """A compiled template; :meth:`render` applies it to a JSON-like value."""

    source: str
    nodes: tuple[Node, ...]

    def render(self, value: Any) -> str:
        return "".join(_render(list(self.nodes), value))


def _render(nodes: list[Node], value: Any) -> list[str]:
    out: list[str] = []
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "path":
            out.append(" ".join(_show(v) for v in select(value, node.steps)))
        else:
            for item in select(value, node.steps):
                out += _render(node.body, item)
    return out


def compile_template(template: str) -> Template:
    """Parse ``template``; raises :class:`JsonPathError` naming the position of a fault."""
    if not template:
        raise JsonPathError("jsonpath template is empty", hint="e.g. -o jsonpath='{.spec.address}'")
    return Template(template, tuple(_nest(template, _tokens(template))))
