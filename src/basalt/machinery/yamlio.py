"""YAML in and out: documents with the line of every key, and canonical output."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigSyntaxError

Loc = tuple[str | int, ...]

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class RawDocument:
    """One parsed YAML document and the 1-based line of each path inside it."""

    data: Any
    line: int | None
    positions: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc``, or of its nearest parent that has one."""
        for end in range(len(loc), 0, -1):
            found = self.positions.get(loc[:end])
            if found is not None:
                return found
        return self.line


#: More paths than this in one document is refused (it guards against alias bombs).
MAX_PATHS = 100_000

#: Deeper nesting than this is refused: configs are a few levels deep, and merging or
#: copying a much deeper value would exhaust Python's recursion limit.
MAX_DEPTH = 100


def _walk(node: yaml.Node, loc: Loc, positions: dict[Loc, int], source: str | None) -> None:
    positions.setdefault(loc, node.start_mark.line + 1)
    if len(positions) > MAX_PATHS:
        raise ConfigSyntaxError(
            f"document has more than {MAX_PATHS} values",
            source=source,
            line=node.start_mark.line + 1,
            hint="a machine config is small; check for runaway YAML aliases",
        )
    if len(loc) > MAX_DEPTH:
        raise ConfigSyntaxError(
            f"values are nested more than {MAX_DEPTH} levels deep",
            source=source,
            line=node.start_mark.line + 1,
            column=node.start_mark.column + 1,
            hint="a machine config is a few levels deep; check for runaway brackets",
        )
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and key in seen:
                raise ConfigSyntaxError(
                    f"duplicate key {key!r} (first at line {seen[key]})",
                    source=source,
                    line=line,
                    column=key_node.start_mark.column + 1,
                    hint="each key may appear once per mapping; remove one of them",
                )
            if key is not None:
                seen[key] = line
                positions[(*loc, key)] = line
                _walk(value_node, (*loc, key), positions, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*loc, index), positions, source)


def parse_documents(text: str, source: str | None) -> list[RawDocument]:
    """Parse multi-document YAML; empty documents are skipped.

    Raises :class:`ConfigSyntaxError` naming the source, line and column.
    """
    loader = _Loader(text)
    documents: list[RawDocument] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            positions: dict[Loc, int] = {}
            _walk(node, (), positions, source)
            try:
                data = loader.construct_document(node)
            except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
                # PyYAML's constructors for explicitly tagged scalars fail with plain Python
                # errors on values they cannot convert, e.g. '!!int' with no digits.
                raise ConfigSyntaxError(
                    f"YAML value cannot be converted ({type(exc).__name__}: {exc})",
                    source=source,
                    line=node.start_mark.line + 1,
                    hint="check values with explicit tags such as !!int, !!float, !!bool "
                    "or !!timestamp in the document that starts on this line",
                ) from None
            if data is None:
                continue
            documents.append(RawDocument(data, node.start_mark.line + 1, positions))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = exc.problem or exc.context or "invalid YAML"
        raise ConfigSyntaxError(
            f"YAML syntax error: {reason}",
            source=source,
            line=mark.line + 1 if mark else None,
            column=mark.column + 1 if mark else None,
            hint="check the indentation and quoting around that line",
        ) from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        raise ConfigSyntaxError(f"YAML could not be read: {exc}", source=source) from None
    finally:
        loader.dispose()
    return documents


class _Dumper(yaml.SafeDumper):
    """Block style; multi-line strings (PEM blocks) as literal `|` scalars."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\x85" in value:
        # PyYAML writes NEL raw in plain, single-quoted and block scalars, and reading it
        # back turns it into a line break; only double quotes escape it (as \N).
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _represent_str)


def dump_documents(documents: Iterable[Any]) -> str:
    """Canonical YAML: keys in the order given, block style, stable byte for byte."""
    return yaml.dump_all(
        list(documents),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        explicit_start=True,
        width=4096,
    )


def dump_document(document: Any) -> str:
    return yaml.dump(
        document,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=4096,
    )
