"""``basaltctl get TYPE [ID]``: resources as a table (``wide``: more columns), YAML, JSON
or a JSONPath template; ``--watch`` follows."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run, table

if TYPE_CHECKING:
    from basalt.machinery.api import resource_pb2
    from basalt.machinery.client.client import Client
    from basalt.machinery.resources import ResourceDefinition

    from .jsonpath import Template


class Output(StrEnum):
    table = "table"
    wide = "wide"
    yaml = "yaml"
    json = "json"
    jsonpath = "jsonpath"


@dataclass(frozen=True)
class OutputFormat:
    """An ``-o`` value: a format, and the template of ``jsonpath=TEMPLATE``."""

    kind: Output
    template: Template | None = None

    @property
    def tabular(self) -> bool:
        return self.kind in (Output.table, Output.wide)


def parse_output(value: str) -> OutputFormat:
    """``table``, ``wide``, ``yaml``, ``json`` or ``jsonpath=TEMPLATE``."""
    from basalt.machinery.errors import BasaltError

    name, sep, template = value.partition("=")
    if name == "jsonpath" and sep:
        from .jsonpath import compile_template

        return OutputFormat(Output.jsonpath, compile_template(template))
    if not sep and name in Output.__members__ and name != "jsonpath":
        return OutputFormat(Output(name))
    raise BasaltError(
        f"-o {value!r}: unknown output format",
        hint="use table, wide, yaml, json or jsonpath=TEMPLATE (e.g. "
        "-o jsonpath='{.spec.address}')",
    )


def _lookup(spec: Any, key: str) -> Any:
    """``key`` of ``spec``; dots go into nested objects and through lists (``a.b``: the
    ``b`` of each item of ``a``)."""
    value = spec
    for part in key.split("."):
        if isinstance(value, list):
            value = [item.get(part, "") for item in value if isinstance(item, dict)]
        elif isinstance(value, dict):
            value = value.get(part, "")
        else:
            return ""
    return value


def _cell(value: Any) -> str:
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            return "; ".join(",".join(f"{k}={v}" for k, v in item.items()) for item in value)
        return ",".join(str(v) for v in value)
    return str(value)


def _record(node: str, resource: resource_pb2.Resource) -> dict[str, Any]:
    meta = resource.metadata
    return {
        "node": node,
        "metadata": {
            "namespace": meta.namespace,
            "type": meta.type,
            "id": meta.id,
            "version": meta.version,
            "owner": meta.owner,
            "phase": meta.phase,
            "created": meta.created,
            "updated": meta.updated,
        },
        "spec": json.loads(resource.spec_json or "{}"),
    }


class _Printer:
    """Prints resources as they come; a table (and a jsonpath list) at the end.

    ``jsonpath`` is applied to each resource when one id was asked for or with
    ``--watch``, and otherwise once to the list, as ``{"items": [...]}`` (as kubectl
    does); a newline ends the output unless the template's does.
    """

    def __init__(
        self, output: OutputFormat, definition: ResourceDefinition, watch: bool, one: bool
    ) -> None:
        self.output = output
        self.definition = definition
        self.watch = watch
        self.each = watch or one
        self.rows: list[list[str]] = []
        self.items: list[dict[str, Any]] = []

    @property
    def columns(self) -> tuple[tuple[str, str], ...]:
        wide = self.definition.wide_columns if self.output.kind is Output.wide else ()
        return self.definition.columns + wide

    def header(self) -> list[str]:
        head = ["NODE", "NAMESPACE", "TYPE", "ID", "VERSION"]
        head += [name for name, _ in self.columns]
        return (["EVENT", *head]) if self.watch else head

    def _template(self, value: Any) -> None:
        assert self.output.template is not None
        text = self.output.template.render(value)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()

    def add(self, node: str, resource: resource_pb2.Resource, event: str = "") -> None:
        record = _record(node, resource)
        if self.output.tabular:
            meta, spec = record["metadata"], record["spec"]
            row = [node, meta["namespace"], meta["type"], meta["id"], str(meta["version"])]
            row += [_cell(_lookup(spec, key)) for _, key in self.columns]
            if self.watch:
                print("\t".join([event, *row]), flush=True)
            else:
                self.rows.append(row)
        elif self.output.kind is Output.jsonpath:
            if event:
                record["event"] = event
            if self.each:
                self._template(record)
            else:
                self.items.append(record)
        elif self.output.kind is Output.json:
            if event:
                record["event"] = event
            print(json.dumps(record, sort_keys=False), flush=True)
        else:
            import yaml

            if event:
                record["event"] = event
            sys.stdout.write("---\n" + yaml.safe_dump(record, sort_keys=False))
            sys.stdout.flush()

    def flush(self) -> None:
        if self.output.tabular and not self.watch:
            table(self.header(), self.rows)
        elif self.output.kind is Output.jsonpath and not self.each:
            self._template({"items": self.items})


def get(
    ctx: typer.Context,
    type_name: Annotated[
        str, typer.Argument(metavar="TYPE", help="Resource type or alias ('rd' lists them).")
    ],
    resource_id: Annotated[str | None, typer.Argument(metavar="[ID]", help="One resource.")] = None,
    output: Annotated[
        str,
        typer.Option(
            "-o",
            "--output",
            help="table, wide (more columns), yaml, json, or jsonpath=TEMPLATE "
            "(kubectl's subset: '{.spec.address}', '{range .items[*]}...{end}').",
        ),
    ] = "table",
    watch: Annotated[bool, typer.Option("-w", "--watch", help="Keep printing changes.")] = False,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Show resources: the node's state, typed and versioned."""
    from basalt.machinery.api import resource_pb2
    from basalt.machinery.resources import resolve_type

    definition = resolve_type(type_name)
    printer = _Printer(parse_output(output), definition, watch, one=bool(resource_id))
    events = {v: k.lower() for k, v in resource_pb2.WatchEventType.items()}

    async def work(client: Client, failures: NodeFailures) -> None:
        md = client.metadata()
        if watch:
            request = resource_pb2.ResourceWatchRequest(
                type=definition.type, id=resource_id or "", tail=True
            )
            if printer.output.tabular:
                print("\t".join(printer.header()), flush=True)
            async for change in client.resources.Watch(request, metadata=md):
                if change.metadata.error:
                    failures.report(
                        change.metadata.node, change.metadata.error, change.metadata.code
                    )
                elif change.event != resource_pb2.BOOTSTRAPPED:
                    printer.add(change.metadata.node, change.resource, events[change.event])
            return
        if resource_id:
            answer = await client.resources.Get(
                resource_pb2.ResourceGetRequest(type=definition.type, id=resource_id),
                metadata=md,
                timeout=15,
            )
            for got in failures.keep(answer.messages):
                printer.add(got.metadata.node, got.resource)
        else:
            listing = resource_pb2.ResourceListRequest(type=definition.type)
            async for item in client.resources.List(listing, metadata=md, timeout=30):
                if item.metadata.error:
                    failures.report(item.metadata.node, item.metadata.error, item.metadata.code)
                else:
                    printer.add(item.metadata.node, item.resource)
        printer.flush()

    run(ctx, work, nodes=nodes, endpoints=endpoints)
