"""``basaltctl inspect dependencies``: the node's controllers and resource types as a
Graphviz dot graph (``| dot -Tsvg > deps.svg``).

Controllers are boxes, resource types ellipses. An input (the controller runs again
when it changes) is a dashed edge from the type to the controller; an output is a solid
edge from the controller to the type. Parts of machined outside the controller engine
that own resources (found in the node's store) are grey notes with dotted edges; a
controller writing a type it does not declare gets a red edge. ``--with-resources``
adds how many resources of each type the node holds, and the types nothing reads or
writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Annotated

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run

if TYPE_CHECKING:
    from basalt.machinery.api import machine_pb2
    from basalt.machinery.client.client import Client

app = typer.Typer(
    help="Look at how a node works inside: its controller graph.", no_args_is_help=True
)


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _edge(source: str, target: str, **attributes: str) -> str:
    attrs = ", ".join(f"{k}={_quote(v)}" for k, v in attributes.items())
    return f"  {_quote(source)} -> {_quote(target)} [{attrs}];"


def render_dot(
    node: str,
    controllers: Iterable[machine_pb2.ControllerNode],
    counts: Mapping[str, int],
) -> str:
    """The graph of one node as dot text (``counts`` empty: no resource counts)."""
    lines = [
        f"digraph {_quote('basalt ' + node if node else 'basalt')} {{",
        "  rankdir=LR;",
        f"  label={_quote(node)};" if node else "",
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    types: set[str] = set(counts)
    edges: list[str] = []
    for controller in controllers:
        kinds = {dep.kind for dep in controller.dependencies}
        engine = bool(kinds & {"input", "output"}) or not kinds
        cid = f"controller:{controller.name}"
        if engine:
            lines.append(f"  {_quote(cid)} [label={_quote(controller.name)}, shape=box];")
        else:
            lines.append(
                f"  {_quote(cid)} [label={_quote(controller.name)}, shape=note, "
                'style=filled, fillcolor="#eeeeee"];'
            )
        for dep in controller.dependencies:
            rid = f"resource:{dep.resource_type}"
            types.add(dep.resource_type)
            if dep.kind == "input":
                edges.append(_edge(rid, cid, style="dashed", color="#1f6fb2"))
            elif dep.kind == "output":
                edges.append(_edge(cid, rid, style="solid"))
            elif engine:
                edges.append(_edge(cid, rid, style="bold", color="red", label="undeclared"))
            else:
                edges.append(_edge(cid, rid, style="dotted", color="#777777"))
    for type_ in sorted(types):
        label = f"{type_}\n{counts[type_]}" if type_ in counts else type_
        lines.append(f"  {_quote('resource:' + type_)} [label={_quote(label)}, shape=ellipse];")
    lines += edges
    lines.append("}")
    return "\n".join(line for line in lines if line) + "\n"


@app.command("dependencies")
def dependencies(
    ctx: typer.Context,
    with_resources: Annotated[
        bool,
        typer.Option(
            "--with-resources", help="Add the number of resources of each type (and every type)."
        ),
    ] = False,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Print the controller and resource graph as Graphviz dot (one graph per node)."""
    from basalt.machinery.api import machine_pb2

    async def work(client: Client, failures: NodeFailures) -> None:
        request = machine_pb2.ControllerGraphRequest(with_resources=with_resources)
        answer = await client.machine.ControllerGraph(
            request, metadata=client.metadata(), timeout=30
        )
        for graph in failures.keep(answer.messages):
            print(render_dot(graph.metadata.node, graph.controllers, dict(graph.counts)), end="")

    run(ctx, work, nodes=nodes, endpoints=endpoints)
