"""``basaltctl get TYPE [ID]``: resources as a table, YAML or JSON; ``--watch`` follows."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run, table

if TYPE_CHECKING:
    from basalt.machinery.api import resource_pb2
    from basalt.machinery.client.client import Client
    from basalt.machinery.resources import ResourceDefinition


class Output(StrEnum):
    table = "table"
    yaml = "yaml"
    json = "json"


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
    def __init__(self, output: Output, definition: ResourceDefinition, watch: bool) -> None:
        self.output = output
        self.definition = definition
        self.watch = watch
        self.rows: list[list[str]] = []

    def header(self) -> list[str]:
        head = ["NODE", "NAMESPACE", "TYPE", "ID", "VERSION"]
        head += [name for name, _ in self.definition.columns]
        return (["EVENT", *head]) if self.watch else head

    def add(self, node: str, resource: resource_pb2.Resource, event: str = "") -> None:
        record = _record(node, resource)
        if self.output is Output.table:
            meta, spec = record["metadata"], record["spec"]
            row = [node, meta["namespace"], meta["type"], meta["id"], str(meta["version"])]
            row += [_cell(spec.get(key, "")) for _, key in self.definition.columns]
            if self.watch:
                print("\t".join([event, *row]), flush=True)
            else:
                self.rows.append(row)
        elif self.output is Output.json:
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
        if self.output is Output.table and not self.watch:
            table(self.header(), self.rows)


def get(
    ctx: typer.Context,
    type_name: Annotated[
        str, typer.Argument(metavar="TYPE", help="Resource type or alias ('rd' lists them).")
    ],
    resource_id: Annotated[str | None, typer.Argument(metavar="[ID]", help="One resource.")] = None,
    output: Annotated[
        Output, typer.Option("-o", "--output", help="table, yaml or json.")
    ] = Output.table,
    watch: Annotated[bool, typer.Option("-w", "--watch", help="Keep printing changes.")] = False,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Show resources: the node's state, typed and versioned."""
    from basalt.machinery.api import resource_pb2
    from basalt.machinery.resources import resolve_type

    definition = resolve_type(type_name)
    printer = _Printer(output, definition, watch)
    events = {v: k.lower() for k, v in resource_pb2.WatchEventType.items()}

    async def work(client: Client, failures: NodeFailures) -> None:
        md = client.metadata()
        if watch:
            request = resource_pb2.ResourceWatchRequest(
                type=definition.type, id=resource_id or "", tail=True
            )
            if output is Output.table:
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
